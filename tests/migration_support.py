"""Helpers for the migration tests: ``memslots run`` in this process (on the KVM model) or as
a child process, and what a test compares between a source and its destination."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ConnectError
from qmp_support import Client

from memslots.monitor.runtime import MachineRuntime, serve
from memslots.options import QmpEndpoint, parse_machine_config, parse_migration_uri

#: A 1 TiB device with dynamic memslots beside 512 MiB of boot RAM (the model's defaults give
#: it 256 memslots of 4 GiB).
SIM_MACHINE = (
    "512M,maxmem=1025G",
    ("memory-backend-ram,id=mem0,size=1T,reserve=off",),
    ("virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",),
)
VMEM = "/machine/peripheral/vmem0"
WAIT = 30.0


@dataclass
class InProcess:
    """``memslots run`` served by a task of this loop."""

    runtime: MachineRuntime
    sock: str
    task: asyncio.Task[None]

    async def wait(self, timeout: float = WAIT) -> BaseException | None:
        """Wait for the process to end; its error (a destination whose load failed)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except Exception as exc:
            return exc
        return None


@contextlib.asynccontextmanager
async def in_process(
    directory: str,
    name: str,
    machine: tuple[str, Sequence[str], Sequence[str]] = SIM_MACHINE,
    *,
    incoming: str | None = None,
    autostart: bool = True,
    guest: bool = True,
) -> AsyncIterator[InProcess]:
    """A machine on the KVM model with a QMP socket ``<directory>/<name>.sock``."""
    memory, objects, devices = machine
    config = parse_machine_config(memory, objects, devices, accel="sim")
    sock = os.path.join(directory, f"{name}.sock")
    ready: asyncio.Future[MachineRuntime] = asyncio.get_running_loop().create_future()
    uri = None if incoming is None else parse_migration_uri(incoming, incoming=True, defer=True)
    task = asyncio.get_running_loop().create_task(
        serve(
            config,
            [QmpEndpoint(path=sock)],
            guest=guest,
            install_signals=False,
            ready=ready.set_result,
            incoming=uri,
            autostart=autostart,
        )
    )
    waiting: set[asyncio.Future[Any]] = {ready, task}
    await asyncio.wait(waiting, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    if task.done() and not ready.done():
        task.result()  # raises what went wrong
    proc = InProcess(ready.result(), sock, task)
    try:
        yield proc
    finally:
        if not task.done():
            proc.runtime.quit()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def client(sock: str) -> AsyncIterator[Client]:
    """qemu.qmp, connected and negotiated."""
    qmp = Client("test")
    # The socket's file exists a moment before the server listens on it.
    for attempt in range(100):
        try:
            await asyncio.wait_for(qmp.connect(sock), WAIT)
            break
        except ConnectError:
            if attempt == 99:
                raise
            await asyncio.sleep(0.05)
    try:
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()


async def resize(qmp: Client, size: int, timeout: float = WAIT) -> None:
    """Set vmem0's requested-size and wait until the guest plugged it."""
    await qmp.execute("qom-set", {"path": VMEM, "property": "requested-size", "value": size})
    deadline = time.monotonic() + timeout
    while await qmp.execute("qom-get", {"path": VMEM, "property": "size"}) != size:
        assert time.monotonic() < deadline, "the guest did not reach the requested size"
        await asyncio.sleep(0.02)


async def until_migrated(qmp: Client, timeout: float = WAIT) -> dict[str, Any]:
    """Poll query-migrate until the migration ended; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.02)


async def until_transferred(qmp: Client, nbytes: int, timeout: float = WAIT) -> None:
    """Poll query-migrate until the migration is active and sent ``nbytes``."""
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        if info.get("ram", {}).get("transferred", 0) >= nbytes:
            return
        assert info.get("status") in ("setup", "active"), info
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.02)


async def until_status(qmp: Client, status: str, timeout: float = WAIT) -> None:
    """Poll query-status until the run state is ``status``."""
    deadline = time.monotonic() + timeout
    while (await qmp.execute("query-status"))["status"] != status:
        assert time.monotonic() < deadline, f"never {status}"
        await asyncio.sleep(0.02)


@dataclass
class Events:
    """Every event a client received, in order."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    def names(self, *wanted: str) -> list[str]:
        return [e["event"] for e in self.seen if not wanted or e["event"] in wanted]

    def statuses(self) -> list[str]:
        return [e["data"]["status"] for e in self.seen if e["event"] == "MIGRATION"]


@contextlib.asynccontextmanager
async def recording(qmp: Client) -> AsyncIterator[Events]:
    """Collect the client's events while the block runs (and a moment after)."""
    events = Events()
    with qmp.listener() as listener:

        async def pump() -> None:
            async for event in listener:
                events.seen.append(dict(event))

        task = asyncio.get_running_loop().create_task(pump())
        try:
            yield events
            await asyncio.sleep(0.1)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- child processes -------------------------------------------------------------------------


@contextlib.contextmanager
def socket_dir() -> Iterator[str]:
    """A short directory for sockets (the 108-byte limit)."""
    path = tempfile.mkdtemp(prefix="mig", dir="/tmp")
    try:
        yield path
    finally:
        for entry in os.listdir(path):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, entry))
        os.rmdir(path)


@contextlib.contextmanager
def spawned(args: Sequence[str], sock: str) -> Iterator[subprocess.Popen[bytes]]:
    """``memslots run ARGS -qmp unix:SOCK`` as a child; yielded once it listens. Killed and
    reaped at the end whatever happened."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "memslots.cli.main", "run", *args, "-qmp", f"unix:{sock}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"memslots run exited {proc.returncode}: {out}")
            assert time.monotonic() < deadline, "memslots run did not start"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


def output(proc: subprocess.Popen[bytes]) -> str:
    """What an ended child printed."""
    assert proc.stdout is not None
    return proc.stdout.read().decode()
