"""The client functions behind ``memslots qmp``, ``resize`` and ``info``, against a live server."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator

import pytest
from qmp_support import ServerThread, make_machine, socket_dir
from rich.console import Console

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_TIMEOUT, MemslotsError
from memslots.guest.inorder import drive_to
from memslots.machine.machine import Machine
from memslots.monitor.client import run_info, run_qmp, run_resize
from memslots.monitor.qmp_server import Command, Param
from memslots.sizes import GiB, MiB


class Captured:
    """Consoles that write into strings."""

    def __init__(self) -> None:
        self.out_buf, self.err_buf = io.StringIO(), io.StringIO()
        self.out = Console(file=self.out_buf, width=200, force_terminal=False)
        self.err = Console(file=self.err_buf, width=200, force_terminal=False)

    @property
    def stdout(self) -> str:
        return self.out_buf.getvalue()

    @property
    def stderr(self) -> str:
        return self.err_buf.getvalue()


def status(call: Callable[[], int], c: Captured) -> int:
    """The exit status the command line ends with, its message in ``c.stderr`` as it prints it."""
    try:
        return call()
    except MemslotsError as exc:
        c.err.print(f"memslots: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code


@pytest.fixture
def machine() -> Iterator[Machine]:
    with make_machine() as m:
        yield m


@pytest.fixture
def sock() -> Iterator[str]:
    with socket_dir() as d:
        yield f"{d}/qmp.sock"


def test_run_qmp(machine: Machine, sock: str) -> None:
    with ServerThread(machine, sock):
        c = Captured()
        code = status(
            lambda: run_qmp(sock, "qom-get", ["path=vmem0", "property=block-size"], out=c.out), c
        )
        assert code == EXIT_OK and json.loads(c.stdout) == 2 * MiB
        c = Captured()
        assert status(lambda: run_qmp(sock, "query-memory-size-summary", out=c.out), c) == EXIT_OK
        assert json.loads(c.stdout) == {"base-memory": 4 * GiB, "plugged-memory": GiB}
        c = Captured()
        code = status(
            lambda: run_qmp(sock, "qom-get", ['{"path": "nope", "property": "size"}'], out=c.out), c
        )
        assert code == EXIT_BAD_INPUT
        assert c.stderr.strip() == "memslots: qom-get: DeviceNotFound: Device 'nope' not found"
        c = Captured()
        assert status(lambda: run_qmp(sock, "qom-get", ["oops"], out=c.out), c) == EXIT_BAD_INPUT
        assert "not of the form key=value" in c.stderr
    c = Captured()
    assert status(lambda: run_qmp(sock, "query-status", out=c.out), c) == EXIT_BAD_INPUT
    assert c.stderr.startswith(f"memslots: cannot connect to {sock}")


def test_run_info_tables_and_json(machine: Machine, sock: str) -> None:
    drive_to(machine.virtio_mem("vmem0"), 1536 * MiB)
    with ServerThread(machine, sock):
        c = Captured()
        assert status(lambda: run_info(sock, "memory-devices", out=c.out), c) == EXIT_OK
        assert "virtio-mem" in c.stdout and "dimm0" in c.stdout and "(GiB)" in c.stdout
        vmem0 = next(line for line in c.stdout.splitlines() if "vmem0" in line)
        assert " 1.5 " in vmem0  # plugged, in the column's one unit
        c = Captured()
        assert status(lambda: run_info(sock, "memslots", out=c.out), c) == EXIT_OK
        rows = [line for line in c.stdout.splitlines() if "vmem0" in line]
        assert len(rows) == 2 and "6 unmapped not shown (--all)" in c.stdout  # mapped only
        c = Captured()
        assert status(lambda: run_info(sock, "memslots", show_all=True, out=c.out), c) == EXIT_OK
        rows = [line for line in c.stdout.splitlines() if "vmem0" in line]
        assert len(rows) == 8 and sum(" yes " in r for r in rows) == 2
        c = Captured()
        assert status(lambda: run_info(sock, "budget", out=c.out), c) == EXIT_OK
        assert "kvm" in c.stdout and "Device memory" in c.stdout
        assert "KVM slot-zap-all: off" in c.stdout  # the model disables the quirk, as KVM
        c = Captured()
        assert status(lambda: run_info(sock, "memslots", json_output=True, out=c.out), c) == EXIT_OK
        slots = json.loads(c.stdout)
        assert [s["mapped"] for s in slots if s["device"] == "vmem0"] == [True] * 2 + [False] * 6
        c = Captured()
        assert status(lambda: run_info(sock, "cpus", out=c.out), c) == EXIT_BAD_INPUT
        assert "expects one of memory-devices, memslots, budget" in c.stderr


def test_resize_wait_follows_the_guest(machine: Machine, sock: str) -> None:
    with ServerThread(machine, sock, guest=True):
        c = Captured()
        code = status(
            lambda: run_resize(sock, "vmem0", "2G", wait=True, timeout=20, poll=0.1, out=c.out), c
        )
        assert code == EXIT_OK, c.stderr
        assert "vmem0: plugged 2 GiB in" in c.stdout
        assert machine.virtio_mem("vmem0").size == 2 * GiB
        c = Captured()
        path = "/machine/peripheral/vmem0"
        code = status(
            lambda: run_resize(sock, path, 512 * MiB, wait=True, timeout=20, poll=0.1, out=c.out), c
        )
        assert code == EXIT_OK, c.stderr
        assert machine.virtio_mem("vmem0").size == 512 * MiB


def test_resize_without_guest(machine: Machine, sock: str) -> None:
    with ServerThread(machine, sock) as server:
        c = Captured()
        assert status(lambda: run_resize(sock, "vmem0", "1G", out=c.out), c) == EXIT_OK
        assert "requested-size set to 1 GiB (plugged 0 B)" in c.stdout
        c = Captured()
        code = status(
            lambda: run_resize(sock, "vmem0", "1G", wait=True, timeout=0.5, poll=0.1, out=c.out), c
        )
        assert code == EXIT_TIMEOUT
        assert "timed out after" in c.stderr and "the size never changed" in c.stderr
        # The guest moved, then stopped short of the request.
        dev = machine.virtio_mem("vmem0")
        server.call(lambda: drive_to(dev, 512 * MiB))
        c = Captured()
        code = status(
            lambda: run_resize(sock, "vmem0", "2G", wait=True, timeout=0.5, poll=0.1, out=c.out), c
        )
        assert code == EXIT_TIMEOUT and "plugged 512 MiB of 2 GiB requested" in c.stderr
        c = Captured()
        assert status(lambda: run_resize(sock, "vmem0", "3M", out=c.out), c) == EXIT_BAD_INPUT
        assert "'requested-size' has to be multiples of 'block-size' (0x200000)" in c.stderr
        c = Captured()
        assert status(lambda: run_resize(sock, "nope", "1G", out=c.out), c) == EXIT_BAD_INPUT
        assert "DeviceNotFound: Device '/machine/peripheral/nope' not found" in c.stderr
        c = Captured()
        assert status(lambda: run_resize(sock, "vmem0", "lots", out=c.out), c) == EXIT_BAD_INPUT


def test_resize_fails_when_someone_else_changes_the_request(machine: Machine, sock: str) -> None:
    with ServerThread(machine, sock) as server:
        dev = machine.virtio_mem("vmem0")

        # Another client's request lands right after ours.
        def meanwhile(d: VirtioMem) -> None:
            if d.requested_size == GiB:
                d.set_requested_size(2 * GiB)

        server.call(lambda: dev.config_change_listeners.append(meanwhile))
        c = Captured()
        code = status(
            lambda: run_resize(sock, "vmem0", "1G", wait=True, timeout=5, poll=0.1, out=c.out), c
        )
        assert code == EXIT_BAD_INPUT
        assert "requested-size was changed to 2 GiB by another client" in c.stderr


def test_connection_lost_while_waiting(machine: Machine, sock: str) -> None:
    server = ServerThread(machine, sock)
    with server:
        dev = machine.virtio_mem("vmem0")

        def stop_soon(d: object) -> None:
            monitor = server.monitor
            assert monitor is not None
            # Right after qom-set's reply went out (the command runs without yielding).
            server.loop.call_soon(lambda: server.loop.create_task(monitor.server.close()))

        server.call(lambda: dev.config_change_listeners.append(stop_soon))
        c = Captured()
        code = status(
            lambda: run_resize(sock, "vmem0", "1G", wait=True, timeout=5, poll=0.1, out=c.out), c
        )
        assert code == EXIT_BAD_INPUT and "connection to" in c.stderr and "lost" in c.stderr


def test_resize_gives_up_on_a_server_that_stops_answering(machine: Machine, sock: str) -> None:
    async def hang(args: dict[str, object]) -> object:
        await asyncio.Event().wait()
        return None

    with ServerThread(machine, sock) as server:
        assert server.monitor is not None
        monitor = server.monitor
        params = (Param("path", "str"), Param("property", "str"))
        server.call(lambda: monitor.server.register(Command("qom-get", hang, params)))
        c = Captured()
        code = status(
            lambda: run_resize(sock, "vmem0", "1G", wait=True, timeout=0.3, poll=0.1, out=c.out), c
        )
        assert code == EXIT_TIMEOUT and "the server stopped answering" in c.stderr, c.stderr
