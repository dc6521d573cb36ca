"""``memslots run`` as a real process, driven by the unmodified qemu.qmp client."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from backends import QemuStorageDaemon, memfd_mappings
from conftest import requires_kvm, requires_memcg, requires_qsd
from kmem_support import memory_cgroup_of
from machines import ACCEPTANCE
from qemu.qmp import ExecuteError
from qmp_support import Client, next_event, qmp_client, socket_dir

from memslots.errors import EXIT_TIMEOUT
from memslots.host.kmem import locate_memory_cgroup, open_meter
from memslots.monitor.runtime import MachineRuntime, serve
from memslots.options import MachineConfig, QmpEndpoint, parse_machine_config
from memslots.sizes import GiB, KiB
from memslots.vhost.user.consumer import ConnectionState, VhostUserConsumer

MACHINE = [
    "-m",
    "4G,maxmem=20G",
    "-object",
    "memory-backend-ram,id=mem0,size=16G,reserve=off",
    "-device",
    "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
]


@contextmanager
def running(
    *extra: str, machine: Sequence[str] = MACHINE
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``memslots run`` in a child process; yields it and its QMP socket once it listens."""
    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "qmp.sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memslots.cli.main",
            "run",
            *machine,
            *extra,
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)


async def drive(sock: str) -> dict[str, object]:
    qmp = Client("test")
    await qmp.connect(sock)
    try:
        devs = await qmp.execute("query-memory-devices")
        assert devs == [
            {
                "type": "virtio-mem",
                "data": {
                    "id": "vmem0",
                    "memaddr": 5 * GiB,
                    "requested-size": 0,
                    "size": 0,
                    "max-size": 16 * GiB,
                    "block-size": 2 << 20,
                    "node": 0,
                    "memdev": "/objects/mem0",
                },
            }
        ]
        sizes: list[int] = []
        with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as listener:
            await qmp.execute(
                "qom-set",
                {
                    "path": "/machine/peripheral/vmem0",
                    "property": "requested-size",
                    "value": 3 * GiB,
                },
            )
            while not sizes or sizes[-1] != 3 * GiB:
                event = await next_event(listener, 10)
                assert event["data"]["qom-path"] == "/machine/peripheral/vmem0"
                assert event["data"]["id"] == "vmem0"
                sizes.append(event["data"]["size"])
        assert sizes == sorted(sizes)
        assert await qmp.execute("qom-get", {"path": "vmem0", "property": "size"}) == 3 * GiB
        slots = await qmp.execute("x-query-memslots")
        assert isinstance(slots, list)
        mapped = [s for s in slots if s["mapped"]]
        assert [s["index"] for s in mapped] == [0, 1, 2]
        assert all(s["plugged-blocks"] > 0 for s in mapped)
        assert all(s["plugged-blocks"] == 0 for s in slots if not s["mapped"])
        status = await qmp.execute("query-status")
        assert isinstance(status, dict) and status["status"] == "running"
        meta = await qmp.execute("x-query-kernel-metadata")
        await qmp.execute("quit")
    finally:
        # After 'quit' the server hangs up; qemu.qmp reports that EOF from disconnect().
        with contextlib.suppress(EOFError):
            await qmp.disconnect()
    return {"sizes": sizes, "kernel-metadata": meta}


@pytest.mark.parametrize("accel", ["sim", pytest.param("kvm", marks=requires_kvm)])
def test_run_resize_and_quit(accel: str, request: pytest.FixtureRequest) -> None:
    if accel == "kvm":
        request.getfixturevalue("memslot_stressor")
    # On the kernel, the child process starts inside a meter of ours: what it leaves charged
    # after it exits (its VM included) shows there, and nothing else on the host does.
    with open_meter() if accel == "kvm" else contextlib.nullcontext() as meter:
        with running("-accel", accel) as (proc, sock):
            got = asyncio.run(drive(sock))
            assert proc.wait(timeout=20) == 0
        assert not Path(sock).exists()
        meta = got["kernel-metadata"]
        assert isinstance(meta, dict)
        if accel == "kvm":
            assert meter is not None
            kernel = meta["kernel-memory"]
            if meter.source == "cgroup":
                # The process lived in a cgroup of its own: its VM (3 mapped memslots of 1 GiB
                # and boot RAM), the vCPU, and what the process itself holds in the kernel.
                assert kernel["source"] == "cgroup" and kernel["disturbed"] is False
                assert 0 <= kernel["bytes"] - kernel["model-bytes"] < 2 << 20, kernel
                # the VM is gone with the process: no memslot of ours is left in the kernel
                assert abs(meter.used()) < 1 << 20
        else:
            assert "kernel-memory" not in meta


@requires_kvm
@requires_memcg
def test_run_lives_in_its_own_cgroup_until_sigterm() -> None:
    with running("-accel", "kvm") as (proc, _):
        assert os.path.basename(memory_cgroup_of(proc.pid)) == f"memslots-{proc.pid}-1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    location = locate_memory_cgroup()
    assert not os.path.exists(os.path.join(location.path, f"memslots-{proc.pid}-1"))


def test_sigterm_shuts_down_cleanly() -> None:
    with running("-accel", "sim") as (proc, sock):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not Path(sock).exists()


def test_resize_without_guest_times_out_with_reason() -> None:
    with running("-accel", "sim", "-guest", "none") as (proc, sock):
        resize = [sys.executable, "-m", "memslots.cli.main", "resize", sock, "vmem0", "1G"]
        done = subprocess.run(
            [*resize, "--wait", "--timeout", "2"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == EXIT_TIMEOUT == 3
        assert done.stderr.startswith("memslots: vmem0: timed out after")
        assert "never changed" in done.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


@requires_qsd
def test_device_add_vhost_user_blk_over_qmp(tmp_path: Path) -> None:
    from backends import QemuStorageDaemon, memfd_mappings, wait_until

    with QemuStorageDaemon(tmp_path) as qsd:
        machine = [
            "-m",
            "1G,maxmem=9G",
            "-object",
            "memory-backend-memfd,id=mem0,size=8G,share=on",
            "-device",
            "virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G",
            "-chardev",
            f"socket,id=blk0,path={qsd.socket_path}",
        ]

        async def go(sock: str) -> None:
            qmp = Client("test")
            await qmp.connect(sock)
            # QEMU's rule: vmem0 decided on several memslots, so a 32-slot back-end is refused
            with pytest.raises(ExecuteError, match="would further restricts"):
                await qmp.execute(
                    "device_add",
                    {"driver": "vhost-user-blk-pci", "id": "disk0", "chardev": "blk0"},
                )
            # ... unless it is charged only for what it really maps (our opt-in extension)
            await qmp.execute(
                "device_add",
                {
                    "driver": "vhost-user-blk-pci",
                    "id": "disk0",
                    "chardev": "blk0",
                    "memslot-accounting": "precise",
                },
            )
            await qmp.execute(
                "qom-set", {"path": "vmem0", "property": "requested-size", "value": 2 * GiB}
            )
            assert wait_until(lambda: len(memfd_mappings(qsd.memory_pid)) == 2, timeout=10)
            await qmp.execute("device_del", {"id": "disk0"})
            assert wait_until(lambda: memfd_mappings(qsd.memory_pid) == [], timeout=10)
            await qmp.execute("quit")
            with contextlib.suppress(EOFError):
                await qmp.disconnect()

        with running("-accel", "sim", machine=machine) as (proc, sock):
            asyncio.run(go(sock))
            assert proc.wait(timeout=20) == 0


def test_device_add_that_cannot_get_a_guest_is_undone() -> None:
    """With 2 MiB of boot RAM there is no room for a virtqueue: device_add fails and leaves
    nothing behind (the backend can be deleted, the id reused)."""

    async def go(sock: str) -> None:
        qmp = Client("test")
        await qmp.connect(sock)
        await qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": "m1", "size": GiB})
        with pytest.raises(ExecuteError, match="no room for the virtqueue"):
            await qmp.execute("device_add", {"driver": "virtio-mem", "id": "v1", "memdev": "m1"})
        assert await qmp.execute("query-memory-devices") == []
        await qmp.execute("object-del", {"id": "m1"})
        # an id-less virtio-mem cannot get a guest driver either, and is refused whole
        await qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": "m2", "size": GiB})
        with pytest.raises(ExecuteError, match="needs an id"):
            await qmp.execute("device_add", {"driver": "virtio-mem", "memdev": "m2"})
        assert await qmp.execute("query-memory-devices") == []
        await qmp.execute("quit")
        with contextlib.suppress(EOFError):
            await qmp.disconnect()

    with running("-accel", "sim", machine=["-m", "2M,maxmem=10G"]) as (proc, sock):
        asyncio.run(go(sock))
        assert proc.wait(timeout=20) == 0


@requires_qsd
def test_vhost_user_loss_is_an_event_and_reconnect_replays(tmp_path: Path) -> None:
    from backends import QemuStorageDaemon, memfd_mappings, wait_until

    with QemuStorageDaemon(tmp_path) as qsd:
        machine = [
            "-m", "1G,maxmem=9G",
            "-object", "memory-backend-memfd,id=mem0,size=8G,share=on",
            "-chardev", f"socket,id=blk0,path={qsd.socket_path}",
            "-device", "vhost-user-blk-pci,id=disk0,chardev=blk0,memslot-accounting=precise",
            "-device", "virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G",
        ]  # fmt: skip

        async def go(sock: str) -> None:
            qmp = Client("test")
            await qmp.connect(sock)
            resize = {"path": "vmem0", "property": "requested-size"}
            await qmp.execute("qom-set", {**resize, "value": 2 * GiB})
            assert wait_until(lambda: len(memfd_mappings(qsd.memory_pid)) == 2, timeout=10)
            with qmp.listener("X_VHOST_USER_STATE") as states:
                qsd.kill()
                await qmp.execute("qom-set", {**resize, "value": 3 * GiB})
                lost = await next_event(states, 10)
                assert lost["data"]["id"] == "disk0" and lost["data"]["state"] == "disconnected"
                budget = await qmp.execute("x-query-memslot-budget")
                assert isinstance(budget, dict)
                disk = next(c for c in budget["consumers"] if c["name"] == "disk0")
                assert disk["connected"] is False
                qsd.restart()
                await qmp.execute("x-vhost-user-reconnect", {"id": "disk0"})
                back = await next_event(states, 10)
                assert back["data"]["state"] == "connected"
            # the whole table was replayed: the back-end maps the 3 memslots plugged meanwhile
            assert wait_until(lambda: len(memfd_mappings(qsd.memory_pid)) == 3, timeout=10)
            assert await qmp.execute("qom-get", {"path": "vmem0", "property": "size"}) == 3 * GiB
            await qmp.execute("quit")
            with contextlib.suppress(EOFError):
                await qmp.disconnect()

        with running("-accel", "sim", machine=machine) as (proc, sock):
            asyncio.run(go(sock))
            assert proc.wait(timeout=20) == 0


FAULT_MACHINE = [
    "-m",
    "1G,maxmem=3G",
    "-object",
    "memory-backend-memfd,id=mem0,size=2G",
    "-device",
    "virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G",
]


async def _plugged(qmp: Client, size: int) -> None:
    """Ask for ``size`` and wait until the guest plugged it."""
    with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as listener:
        await qmp.execute("qom-set", {"path": "vmem0", "property": "requested-size", "value": size})
        # After a reset the fresh driver may have plugged it already: then no event comes.
        if await qmp.execute("qom-get", {"path": "vmem0", "property": "size"}) == size:
            return
        while (await next_event(listener, 20))["data"]["size"] != size:
            pass


async def guest_faults(sock: str, detected_by: str) -> None:
    qmp = Client("test")
    await qmp.connect(sock)
    try:
        [dev] = await qmp.execute("query-memory-devices")
        addr, bs = dev["data"]["memaddr"], dev["data"]["block-size"]
        for access in ("write", "read"):
            await _plugged(qmp, 2 * bs)
            args = {"address": addr + 8, "write": True, "value": 0x5A}
            assert await qmp.execute("x-guest-memory-access", args) == {"outcome": "ram"}
            if detected_by == "efault":  # the vCPU reaches only below 2**phys_bits
                with pytest.raises(ExecuteError, match=r"Parameter 'address': .* physical"):
                    await qmp.execute("x-guest-memory-access", {"address": 1 << 60})
            # Block 3 is unplugged, but memslot 0 is mapped for blocks 0 and 1.
            target = addr + 3 * bs + 5
            with qmp.listener(("X_GUEST_MEMORY_FAULT", "STOP")) as listener:
                args = {"address": target, "write": access == "write"}
                assert await qmp.execute("x-guest-memory-access", args) == {"outcome": "fault"}
                fault, stop = await next_event(listener, 10), await next_event(listener, 10)
            assert fault["event"] == "X_GUEST_MEMORY_FAULT" and stop["event"] == "STOP"
            assert fault["data"] == {
                "id": "vmem0",
                "qom-path": "/machine/peripheral/vmem0",
                "address": target,
                "size": 1,
                "access": access,
                "block-address": addr + 3 * bs,
                "detected-by": detected_by,
            }
            status = await qmp.execute("query-status")
            assert status == {"status": "internal-error", "singlestep": False, "running": False}
            with pytest.raises(ExecuteError, match="Resetting the Virtual Machine is required"):
                await qmp.execute("cont")
            with pytest.raises(ExecuteError, match="not running"):
                await qmp.execute("x-guest-memory-access", {"address": addr + 8})

            with qmp.listener("RESET") as listener:
                await qmp.execute("system_reset")
                await next_event(listener, 10)
            assert (await qmp.execute("query-status"))["status"] == "prelaunch"
            with qmp.listener("RESUME") as listener:
                await qmp.execute("cont")
                await next_event(listener, 10)
            assert (await qmp.execute("query-status"))["status"] == "running"
        await qmp.execute("quit")
    finally:
        with contextlib.suppress(EOFError):
            await qmp.disconnect()


@pytest.mark.parametrize(
    ("accel", "detected_by"), [("sim", "model"), pytest.param("kvm", "efault", marks=requires_kvm)]
)
def test_guest_memory_fault_stops_the_vm_until_a_reset(accel: str, detected_by: str) -> None:
    """``memslots run`` with the real qemu.qmp client: a guest write, then a read, of an
    unplugged block in a mapped memslot each give ``X_GUEST_MEMORY_FAULT`` and ``STOP`` and
    leave the VM in ``internal-error`` (on the kernel: from the real vCPU, at CPL3); ``cont``
    is refused until ``system_reset`` (then ``prelaunch``, and ``cont`` runs it again)."""
    with running("-accel", accel, machine=FAULT_MACHINE) as (proc, sock):
        asyncio.run(guest_faults(sock, detected_by))
        assert proc.wait(timeout=20) == 0


@requires_qsd
def test_a_back_end_killed_while_nothing_changes_is_an_event(tmp_path: Path) -> None:
    """QEMU learns of a vhost-user back-end's hang-up from its chardev at once. So does run: a
    back-end killed while the guest changes nothing is reported as disconnected without
    waiting for the next memory-table change, on every connection (after a reconnect too).
    (Found by bench/soak.py: the loss was noticed only at the next memslot create or delete,
    so a back-end killed and restarted meanwhile never produced the event.)"""
    from backends import QemuStorageDaemon, memfd_mappings, wait_until

    with QemuStorageDaemon(tmp_path) as qsd:
        machine = [
            "-m", "1G,maxmem=9G",
            "-object", "memory-backend-memfd,id=mem0,size=8G,share=on",
            "-chardev", f"socket,id=blk0,path={qsd.socket_path}",
            "-device", "vhost-user-blk-pci,id=disk0,chardev=blk0,memslot-accounting=precise",
            "-device", "virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G",
        ]  # fmt: skip

        async def go(sock: str) -> None:
            qmp = Client("test")
            await qmp.connect(sock)
            await qmp.execute(
                "qom-set", {"path": "vmem0", "property": "requested-size", "value": GiB}
            )
            assert wait_until(lambda: len(memfd_mappings(qsd.memory_pid)) == 1, timeout=10)
            with qmp.listener("X_VHOST_USER_STATE") as states:
                for _ in range(2):
                    qsd.kill()
                    lost = await next_event(states, 30)
                    assert lost["data"]["state"] == "disconnected", lost
                    assert lost["data"]["reason"]
                    qsd.start()
                    await qmp.execute("x-vhost-user-reconnect", {"id": "disk0"})
                    back = await next_event(states, 30)
                    assert back["data"] == {"id": "disk0", "state": "connected"}
            assert await qmp.execute("qom-get", {"path": "vmem0", "property": "size"}) == GiB
            await qmp.execute("quit")
            with contextlib.suppress(EOFError):
                await qmp.disconnect()

        with running("-accel", "sim", machine=machine) as (proc, sock):
            asyncio.run(go(sock))
            assert proc.wait(timeout=20) == 0


def test_out_of_file_descriptors_refuses_cleanly_and_logs_once() -> None:
    """With its descriptors exhausted, ``run`` takes each new connection with a reserve
    descriptor, answers it with an error and closes it, logs that once, and goes on serving
    its clients. (asyncio's own accept loop logged a traceback per attempt, ~40 MB in 15 s,
    and left the clients hanging.)"""

    async def go(proc: subprocess.Popen[bytes], sock: str) -> None:
        qmp = Client("test")
        await qmp.connect(sock)
        nofile = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        highest = max(int(fd) for fd in os.listdir(f"/proc/{proc.pid}/fd"))
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (highest + 3, nofile[1]))
        served, refused = [], 0
        for _ in range(40):
            reader, writer = await asyncio.open_unix_connection(sock)
            line = await asyncio.wait_for(reader.readline(), 10)
            if b"refused" in line:
                assert b"out of file descriptors" in line
                assert await asyncio.wait_for(reader.read(), 10) == b""
                writer.close()
                refused += 1
            else:
                assert b'"QMP"' in line
                served.append(writer)
        assert len(served) < 5 and refused > 35
        assert (await qmp.execute("query-status"))["running"] is True
        for writer in served:
            writer.close()
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, nofile)
        again = Client("again")
        await again.connect(sock)
        await again.disconnect()
        await qmp.execute("quit")
        with contextlib.suppress(EOFError):
            await qmp.disconnect()

    with running("-accel", "sim") as (proc, sock):
        asyncio.run(go(proc, sock))
        assert proc.wait(timeout=20) == 0
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
    assert "Traceback" not in output
    assert output.count("refused a connection") == 1, output


def _process_counts() -> tuple[int, int]:
    """This process's open descriptors and mappings (``/proc/self/maps`` lines)."""
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return len(os.listdir("/proc/self/fd")), maps


def _our_objects() -> Counter[str]:
    """How many objects of each of memslots' types are alive."""
    gc.collect()
    # formatted, as some C types answer __module__ with a descriptor, not a string
    kinds = map(type, gc.get_objects())
    names = (f"{getattr(t, '__module__', '')}.{t.__qualname__}" for t in kinds)
    return Counter(n for n in names if n.startswith("memslots."))


@requires_qsd
def test_plug_unplug_cycles_through_qmp_leave_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running machine (real KVM and vCPU where there is one, a real vhost-user back-end,
    the Linux guest model) plugs and unplugs a memslot 100 times through QMP after a warm-up:
    descriptors and mappings end where they were, per-VM kernel memory too (read after half a
    second of quiet: page-table pages and the memfd's xarray nodes are freed an RCU grace period
    late, ~200 KiB right after an unplug; settled, readings agree to a page per CPU; the bound
    leaves room for a slow grace period on a busy host, a 1 GiB memslot's metadata is 2.5 MiB),
    and no kind of our objects keeps growing (the guest's request log kept ~16 per cycle
    before). The full-size run, 10^4 cycles with the process's RSS, is
    ``bench/run_cycles.py``."""
    from memslots.monitor import runtime

    warmup, cycles = 20, 100
    # A small window, so that the warm-up fills it; the default only takes longer to.
    monkeypatch.setattr(runtime, "REQUEST_LOG", 4)

    async def main(qsd: QemuStorageDaemon, sock: str) -> None:
        config = parse_machine_config(
            "1G,maxmem=9G",
            ["memory-backend-memfd,id=mem0,size=8G,share=on,reserve=off"],
            [
                "vhost-user-blk-pci,id=disk0,chardev=blk0,memslot-accounting=precise",
                "virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G",
            ],
            accel="auto",
            chardevs=[f"socket,id=blk0,path={qsd.socket_path}"],
        )
        started: asyncio.Future[runtime.MachineRuntime] = asyncio.Future()
        serving = asyncio.create_task(
            runtime.serve(
                config, [QmpEndpoint(path=sock)], ready=started.set_result, install_signals=False
            )
        )
        machine = (await asyncio.wait_for(started, 30)).machine
        dev = machine.virtio_mem("vmem0")
        reached = asyncio.Event()
        target = [0]

        def on_size(_: object, size: int) -> None:
            if size == target[0]:
                reached.set()

        dev.size_change_listeners.append(on_size)
        qmp = Client("cycles")
        await qmp.connect(sock)

        async def cycle() -> None:
            for size in (GiB, 0):
                target[0] = size
                reached.clear()
                await qmp.execute(
                    "qom-set", {"path": "vmem0", "property": "requested-size", "value": size}
                )
                await asyncio.wait_for(reached.wait(), 30)
            qmp.events.clear()  # qemu.qmp's catch-all queue would keep every event

        async def kernel_memory() -> int | None:
            if not machine.vm.is_real:
                return None
            await asyncio.sleep(0.5)  # RCU-deferred frees (not a time bound: a quiet moment)
            report = await qmp.execute("x-query-kernel-metadata")
            return int(report["kernel-memory"]["bytes"])

        for _ in range(warmup):
            await cycle()
        objects_before = _our_objects()
        counts_before, kmem_before = _process_counts(), await kernel_memory()
        mapped = len(memfd_mappings(qsd.memory_pid))
        for _ in range(cycles):
            await cycle()
        # A bounded window (such as the request log's, 4 to 8 here) may move by its size.
        growth = _our_objects() - objects_before
        assert all(n <= 8 for n in growth.values()), growth
        assert _process_counts() == counts_before
        kmem_after = await kernel_memory()
        if kmem_before is not None and kmem_after is not None:
            assert abs(kmem_after - kmem_before) <= 128 * KiB, (kmem_before, kmem_after)
        assert len(memfd_mappings(qsd.memory_pid)) == mapped  # the back-end holds no more
        budget = await qmp.execute("x-query-memslot-budget")
        assert next(c for c in budget["consumers"] if c["name"] == "disk0")["connected"]
        await qmp.execute("quit")
        with contextlib.suppress(EOFError):
            await qmp.disconnect()
        await asyncio.wait_for(serving, 30)

    with QemuStorageDaemon(tmp_path) as qsd, tempfile.TemporaryDirectory() as d:
        asyncio.run(main(qsd, os.path.join(d, "qmp.sock")))


def test_resize_wait_ends_with_the_guests_reason() -> None:
    """1 MiB device blocks: Linux plugs 2 MiB sub-blocks (its pageblock), so 5 MiB stops at 4 and
    the guest says why; resize --wait ends with that instead of waiting for its timeout."""
    machine = [*MACHINE[:-1], MACHINE[-1] + ",block-size=1M"]
    with running("-accel", "sim", machine=machine) as (proc, sock):
        resize = [sys.executable, "-m", "memslots.cli.main", "resize", sock, "vmem0", "5M"]
        done = subprocess.run(
            [*resize, "--wait", "--timeout", "600", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr == (
            "memslots: vmem0: plugged 4 MiB of 5 MiB requested; the guest stopped short: the "
            "rest (1 MiB) is less than one sub-block (2 MiB), the driver's unit\n"
        )
        outcome = json.loads(done.stdout)
        assert (outcome["size"], outcome["requested"], outcome["reached"]) == (
            4 << 20,
            5 << 20,
            False,
        )
        assert outcome["stop_reason"].startswith("the rest (1 MiB)")
        assert outcome["seconds"] < 600  # ended when the guest stopped, not at the timeout
        reached = subprocess.run(
            [*resize[:-1], "4M", "--wait", "--json"], capture_output=True, text=True, timeout=120
        )
        assert reached.returncode == 0 and json.loads(reached.stdout)["reached"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


# -- always responsive: the guests run in a thread of their own ------------------------------


async def serve_in_process(
    config: MachineConfig, sock: str, go: Callable[[MachineRuntime], Awaitable[None]]
) -> None:
    """``memslots run``'s serve() in this loop; ``go`` drives it once it listens."""
    started: asyncio.Future[MachineRuntime] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        serve(
            config,
            [QmpEndpoint(path=sock)],
            ready=started.set_result,
            install_signals=False,
        )
    )
    runtime = await asyncio.wait_for(started, 20)
    try:
        await go(runtime)
    finally:
        runtime.quit()
        await asyncio.wait_for(server, 20)


def test_commands_are_answered_in_the_middle_of_a_resize() -> None:
    """A 0 -> 256 GiB grow is 2048 requests: a query issued after the first size change is
    answered between two of them, long before the resize completes."""
    config = parse_machine_config(
        "4G,maxmem=260G",
        ["memory-backend-ram,id=mem0,size=256G,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"],
        accel="sim",
    )
    target = 256 * GiB

    async def go(runtime: MachineRuntime) -> None:
        async with qmp_client(sock) as qmp:
            with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as sizes:
                await qmp.execute(
                    "qom-set", {"path": "vmem0", "property": "requested-size", "value": target}
                )
                first = await next_event(sizes, 20)
                assert 0 < first["data"]["size"] < target
                status = await qmp.execute("query-status")
                assert status["status"] == "running"
                # a command on the machine too: it gets its turn between two guest requests
                mid = await qmp.execute("qom-get", {"path": "vmem0", "property": "size"})
                assert 0 < mid < target
                while (await next_event(sizes, 60))["data"]["size"] != target:
                    pass
            assert await qmp.execute("qom-get", {"path": "vmem0", "property": "size"}) == target

    with socket_dir() as d:
        sock = f"{d}/qmp.sock"
        asyncio.run(serve_in_process(config, sock, go))


def test_a_hung_back_end_holds_neither_the_monitor_nor_shutdown(tmp_path: Path) -> None:
    """While a memory-map commit waits for a vhost-user back-end that stopped answering, QMP
    answers; ``quit`` interrupts the wait instead of sitting out the back-end's timeout."""
    from backends import FakeBackend

    with socket_dir() as d:
        # Negotiation takes 8 requests (GET_CONFIG last); then each memslot is ADD_MEM_REG and
        # GET_FEATURES: the third memslot's ADD_MEM_REG gets no answer.
        fake = FakeBackend(f"{d}/backend.sock", mute_after=8 + 2 * 2)
        config = parse_machine_config(
            "1G,maxmem=9G",
            ["memory-backend-memfd,id=mem0,size=8G,share=on"],
            [
                "vhost-user-blk-pci,id=disk0,chardev=blk0,memslot-accounting=precise",
                "virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G",
            ],
            accel="sim",
            chardevs=[f"socket,id=blk0,path={fake.path}"],
        )
        sock = f"{d}/qmp.sock"
        consumer: list[VhostUserConsumer] = []

        async def go(runtime: MachineRuntime) -> None:
            consumer.append(runtime.machine.vhost_devices["disk0"].consumer)
            async with qmp_client(sock) as qmp:
                await qmp.execute(
                    "qom-set", {"path": "vmem0", "property": "requested-size", "value": 4 * GiB}
                )
                # A request got no answer: the guest's request waits for the back-end.
                deadline = time.monotonic() + 20
                while len(fake.log) <= 8 + 2 * 2:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.005)
                status = await qmp.execute("query-status")
                assert status["status"] == "running"
                assert consumer[0].state is ConnectionState.CONNECTED  # still waiting

        try:
            asyncio.run(serve_in_process(config, sock, go))
        finally:
            fake.close()
        # quit ended the wait: the back-end was cut off as interrupted, not timed out
        assert fake.log[8:] == ["ADD_MEM_REG", "GET_FEATURES"] * 2 + ["ADD_MEM_REG"]
        assert consumer[0].disconnect_reason is not None
        assert consumer[0].disconnect_reason.endswith("ADD_MEM_REG: interrupted")


def test_sigterm_in_the_middle_of_a_resize() -> None:
    async def go(sock: str) -> int:
        qmp = Client("test")
        await qmp.connect(sock)
        with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as sizes:
            await qmp.execute(
                "qom-set", {"path": "vmem0", "property": "requested-size", "value": 1 << 40}
            )
            await next_event(sizes, 20)
        size: int = await qmp.execute("qom-get", {"path": "vmem0", "property": "size"})
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        return size

    with running("-accel", "sim", machine=ACCEPTANCE) as (proc, sock):
        mid = asyncio.run(go(sock))
        assert 0 < mid < 1 << 40  # 8192 requests to go: the resize is far from done
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not Path(sock).exists()
