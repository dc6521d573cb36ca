"""The pre-copy job and the incoming load on their own (no QMP): what travels, what never
does, the bandwidth limit, the channels; and the pieces they stand on (URIs, fd passing,
adopting memory, the paused clock)."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from memslots.devices.virtio_mem.wire import ReqType, Request, Resp, Response
from memslots.errors import HostMemoryError, InaccessibleMemoryError, MigrationError, OptionError
from memslots.host.memory import HostMemory, MemfdBackend, RamBackend
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.migration.channel import MAX_FDS, SocketSink, SocketSource
from memslots.migration.incoming import Incoming
from memslots.migration.machine import LoadedMachine, ram_digest
from memslots.migration.outgoing import Outgoing
from memslots.migration.status import MigrationCapabilities, MigrationParameters, MigrationStatus
from memslots.options import MigrationUri, parse_machine_config, parse_migration_uri
from memslots.sizes import GiB, MiB

BS = 2 * MiB


def machine(*, incoming: bool = False) -> Machine:
    cfg = parse_machine_config(
        "256M,maxmem=5G",
        ["memory-backend-ram,id=mem0,size=4G,reserve=off"],
        [
            "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on,memslot-size=1G,"
            "unplugged-inaccessible=on"
        ],
        accel="sim",
    )
    return Machine(cfg, vm=KvmModel(), incoming=incoming)


T = TypeVar("T")


class Hooks:
    """A source VM without a guest, whose first sync is followed by writes everywhere in the
    device's first memslot: plugged or not (a guest must not touch unplugged blocks, but the
    log of a mapped memslot covers them)."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.running = True
        self.statuses: list[MigrationStatus] = []
        self.passes: list[int] = []
        self.stopped = self.resumed = self.done = 0

    def vcpus_running(self) -> bool:
        return self.running

    def stop_vcpus(self) -> None:
        self.running = False
        self.stopped += 1

    def resume_vcpus(self) -> None:
        self.running = True
        self.resumed += 1

    def migrated(self) -> None:
        self.done += 1

    def guest_state(self) -> tuple[dict[str, tuple[int, bytes]], dict[str, bytes]]:
        return {}, {}

    def dirty_gpa_ranges(self) -> list[tuple[int, int]]:
        return []

    def status_changed(self, status: MigrationStatus) -> None:
        self.statuses.append(status)

    async def locked(self, fn: Callable[[], T]) -> T:
        return fn()

    async def quiesce(self) -> None:
        pass

    def pass_done(self, count: int) -> None:
        self.passes.append(count)
        if count == 1:
            dev = self.m.virtio_mem("vmem0")
            assert isinstance(self.m.vm, KvmModel)
            self.m.vm.mark_dirty(dev.addr, 1 * GiB)
            assert dev.memdev is not None
            # Only block 0 is plugged: blocks 3 and 100 are out of reach, but logged dirty.
            dev.memdev.memory.write(0, b"written while migrating")


async def receive(incoming: Incoming) -> LoadedMachine:
    """The destination: load, then tell the source it runs."""
    loaded = await incoming.run()
    incoming.complete()
    return loaded


def plug(m: Machine, first: int, count: int) -> None:
    dev = m.virtio_mem("vmem0")
    dev.set_requested_size(dev.region_size)
    dev.bitmap  # noqa: B018 - the device plugs through its request path below

    resp = Response.unpack(
        dev.handle_request(Request(ReqType.PLUG, dev.addr + first * BS, count).pack())
    )
    assert resp.type == Resp.ACK


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="out", dir="/tmp")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def test_unplugged_memory_never_travels_even_when_logged_dirty(sockdir: str) -> None:
    async def go() -> None:
        with machine() as src, machine(incoming=True) as dst:
            plug(src, 0, 2)  # blocks 0-1 of memslot 0; blocks 3 and 100 stay unplugged
            uri = MigrationUri("unix", path=f"{sockdir}/m")
            with Incoming(dst, uri) as incoming:
                hooks = Hooks(src)
                job = Outgoing(src, uri, MigrationParameters(), MigrationCapabilities(), hooks)
                loaded, _ = await asyncio.gather(receive(incoming), job.run())
            assert job.status is MigrationStatus.COMPLETED, job.error
            assert loaded.states == {}
            assert hooks.statuses == [
                MigrationStatus.SETUP,
                MigrationStatus.ACTIVE,
                MigrationStatus.COMPLETED,
            ]
            assert hooks.stopped == 1 and hooks.resumed == 0 and hooks.done == 1
            assert hooks.passes == list(range(1, len(hooks.passes) + 1))
            stats = job.info()["ram"]
            assert (stats["normal"] + stats["duplicate"]) * 4096 - job.resent_bytes == (
                256 * MiB + 2 * BS
            )
            # The logged pages of the unplugged blocks were dropped; the plugged one came.
            assert job.resent_bytes <= 2 * BS + 16 * 4096
            mem = dst.backends["mem0"].memory
            assert isinstance(mem, HostMemory)
            assert mem.read(0, 23) == b"written while migrating"
            assert mem.inaccessible(3 * BS, BS) and mem.inaccessible(100 * BS, BS)
            assert ram_digest(src)["mem0"] == ram_digest(dst)["mem0"]
            assert not src.kvm.dirty_logging and not src.virtio_mem("vmem0").busy

    asyncio.run(go())


def test_max_bandwidth_holds_the_live_phase(sockdir: str) -> None:
    """With 1 MiB/s, 2 MiB of data pages take about two seconds (bytes and order asserted;
    the elapsed time only as a lower bound the limit guarantees)."""

    async def go() -> None:
        with machine() as src, machine(incoming=True) as dst:
            plug(src, 0, 1)
            dev = src.virtio_mem("vmem0")
            assert dev.memdev is not None
            dev.memdev.memory.write(0, os.urandom(BS))
            uri = MigrationUri("unix", path=f"{sockdir}/m")
            params = MigrationParameters(max_bandwidth=1 << 20)
            with Incoming(dst, uri) as incoming:
                hooks = Hooks(src)
                hooks.pass_done = lambda count: None  # type: ignore[method-assign]
                job = Outgoing(src, uri, params, MigrationCapabilities(), hooks)
                t0 = time.monotonic()
                await asyncio.gather(receive(incoming), job.run())
            assert job.status is MigrationStatus.COMPLETED, job.error
            assert job.info()["ram"]["normal"] >= 512
            assert time.monotonic() - t0 >= 1.5
            assert ram_digest(src) == ram_digest(dst)

    asyncio.run(go())


def test_a_job_that_cannot_connect_fails_with_the_reason(sockdir: str) -> None:
    async def go() -> None:
        with machine() as src:
            hooks = Hooks(src)
            uri = MigrationUri("unix", path=f"{sockdir}/nobody")
            job = Outgoing(src, uri, MigrationParameters(), MigrationCapabilities(), hooks)
            await job.run()
            assert job.status is MigrationStatus.FAILED
            assert (
                job.error
                == f"Failed to connect to 'unix:{sockdir}/nobody': No such file or directory"
            )
            assert job.info() == {"status": "failed", "error-desc": job.error}
            assert hooks.stopped == 0 and not src.virtio_mem("vmem0").busy

    asyncio.run(go())


def test_x_ignore_shared_needs_a_unix_socket() -> None:
    async def go() -> None:
        cfg = parse_machine_config(
            "256M,maxmem=5G",
            ["memory-backend-memfd,id=mem0,size=4G"],
            ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"],
            accel="sim",
        )
        with Machine(cfg, vm=KvmModel()) as src, Machine(cfg, vm=KvmModel(), incoming=True) as dst:
            listener = Incoming(dst, parse_migration_uri("tcp:127.0.0.1:0", incoming=True))
            with listener:
                caps = MigrationCapabilities(x_ignore_shared=True)
                job = Outgoing(src, listener.address, MigrationParameters(), caps, Hooks(src))
                results = await asyncio.gather(listener.run(), job.run(), return_exceptions=True)
            assert job.status is MigrationStatus.FAILED
            assert job.error is not None and "x-ignore-shared" in job.error
            assert "unix: URI" in job.error
            assert isinstance(results[0], MigrationError)

    asyncio.run(go())


# -- the pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "incoming", "expected"),
    [
        ("unix:/run/m.sock", False, MigrationUri("unix", path="/run/m.sock")),
        ("tcp:127.0.0.1:4444", False, MigrationUri("tcp", host="127.0.0.1", port=4444)),
        ("tcp:[::1]:0", True, MigrationUri("tcp", host="::1", port=0)),
        ("file:/tmp/vm.state", False, MigrationUri("file", path="/tmp/vm.state")),
    ],
)
def test_migration_uris(text: str, incoming: bool, expected: MigrationUri) -> None:
    assert parse_migration_uri(text, incoming=incoming) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp:127.0.0.1:0", "with a port from 1 to 65535"),
        ("tcp:127.0.0.1", "expected tcp:HOST:PORT"),
        ("unix:", "expected unix:PATH"),
        ("file:/x,offset=4096", "offset= is not supported"),
        ("exec:cat", "exec: migration over exec is not supported"),
        ("defer", "unknown migration protocol: defer"),
        ("ssh:host", "unknown migration protocol: ssh:host"),
    ],
)
def test_bad_migration_uris(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_migration_uri(text)


def test_defer_only_where_allowed() -> None:
    assert parse_migration_uri("defer", incoming=True, defer=True) == MigrationUri("defer")


def test_file_descriptors_travel_with_their_bytes_over_a_unix_socket() -> None:
    a, b = socket.socketpair()
    sink, source = SocketSink(a), SocketSource(b)
    r, w = os.pipe()
    try:
        sink.send([b"before"])
        sink.send_fds([b"with fds"], [r, w])
        buf = bytearray(64)
        got = b""
        while len(got) < 14:
            n = source.recv_into(memoryview(buf))
            got += bytes(buf[:n])
        assert got == b"beforewith fds"
        fds = source.take_fds()
        assert len(fds) == 2 and source.take_fds() == []
        os.write(fds[1], b"x")
        assert os.read(r, 1) == b"x"
        for fd in fds:
            os.close(fd)
        with pytest.raises(MigrationError, match=f"at most {MAX_FDS}"):
            sink.send_fds([b"x"], [r] * (MAX_FDS + 1))
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_adopting_memory_maps_the_other_fd_in_place() -> None:
    with MemfdBackend("ours", 8 * MiB) as ours, MemfdBackend("theirs", 8 * MiB) as theirs:
        theirs.write(MiB, b"theirs")
        addr = ours.host_addr
        ours.adopt(os.dup(theirs.fd or -1))
        assert ours.host_addr == addr and ours.read(MiB, 6) == b"theirs"
        ours.write(2 * MiB, b"both")
        assert theirs.read(2 * MiB, 4) == b"both"
    with (
        MemfdBackend("small", 4 * MiB) as small,
        MemfdBackend("big", 8 * MiB) as big,
        pytest.raises(HostMemoryError, match="holds 0x400000 bytes, not 0x800000"),
    ):
        big.adopt(small.fd or -1)
    with (
        RamBackend("anon", 4 * MiB, share=True) as anon,
        MemfdBackend("m", 4 * MiB) as m,
        pytest.raises(HostMemoryError, match="only shared memory with an fd"),
    ):
        anon.adopt(m.fd or -1)


def _perms(addr: int) -> str:
    """The permissions of this process's mapping that holds ``addr`` (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return perms
    raise AssertionError(f"nothing mapped at {addr:#x}")


def test_adopted_memory_keeps_unplugged_ranges_out_of_reach() -> None:
    with MemfdBackend("ours", 8 * MiB) as ours, MemfdBackend("theirs", 8 * MiB) as theirs:
        ours.protect(2 * MiB, 2 * MiB)
        ours.adopt(os.dup(theirs.fd or -1))
        assert _perms(ours.host_addr + 2 * MiB).startswith("---")
        assert _perms(ours.host_addr + 3 * MiB + 4096).startswith("---")
        assert _perms(ours.host_addr + 4 * MiB).startswith("rw")
        with pytest.raises(InaccessibleMemoryError):
            ours.read(2 * MiB, 1)


def test_the_source_switches_over_only_once_the_destination_loaded_the_setup(
    sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination's "setup loaded" (QEMU's switchover-ack): a destination slow to map its
    memslots (here a second) must not make the source stop before it is done."""
    events: list[str] = []

    async def go() -> None:
        with machine() as src, machine(incoming=True) as dst:
            plug(src, 0, 2)
            dev = dst.virtio_mem("vmem0")
            load_early = dev.load_early

            def slow_load_early(state: Any) -> None:
                time.sleep(1.0)  # off the loop (below): the source goes on meanwhile
                load_early(state)
                events.append("destination loaded the setup")

            monkeypatch.setattr(dev, "load_early", slow_load_early)

            async def in_a_thread(fn: Callable[[], T], /) -> T:
                return await asyncio.to_thread(fn)

            hooks = Hooks(src)
            stop = hooks.stop_vcpus

            def stop_vcpus() -> None:
                events.append("source stopped")
                stop()

            monkeypatch.setattr(hooks, "stop_vcpus", stop_vcpus)
            uri = MigrationUri("unix", path=f"{sockdir}/m")
            with Incoming(dst, uri, locked=in_a_thread) as incoming:
                job = Outgoing(src, uri, MigrationParameters(), MigrationCapabilities(), hooks)
                await asyncio.gather(receive(incoming), job.run())
            assert job.status is MigrationStatus.COMPLETED, job.error

    asyncio.run(go())
    assert events == ["destination loaded the setup", "source stopped"]
