"""The vhost-user front-end and consumer, against a fake back-end and Debian's real ones."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backends import (
    FakeBackend,
    QemuStorageDaemon,
    Virtiofsd,
    memfd_mappings,
    wait_until,
)
from conftest import requires_qsd, requires_virtiofsd
from machines import NEGOTIATION, add_virtio_mem, assert_maps, check_invariants, memfd_machine

from memslots.devices.virtio_mem.wire import ReqType, Request, Resp, Response
from memslots.errors import VhostDisconnectedError, VhostError
from memslots.guest.inorder import drive_to
from memslots.host.memory import MemfdBackend
from memslots.memory.address_space import GuestMemory
from memslots.sizes import GiB, KiB, MiB
from memslots.vhost.user.consumer import ConnectionState, VhostUserConsumer
from memslots.vhost.user.frontend import Endpoint, VhostUserFrontend
from memslots.vhost.user.wire import (
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    MemRegion,
    ProtocolFeature,
    Req,
)

MQ, ACK, CONFIG, SLOTS = (1 << f for f in ProtocolFeature)

Entry = tuple[MemRegion, int]
Table = dict[tuple[int, int, int], Entry]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., FakeBackend]]:
    made: list[FakeBackend] = []

    def make(**knobs: object) -> FakeBackend:
        made.append(FakeBackend(str(tmp_path / f"fake{len(made)}.sock"), **knobs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def memfd() -> Iterator[MemfdBackend]:
    with MemfdBackend("slices", 4 * MiB) as mem:
        yield mem


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QemuStorageDaemon]:
    with QemuStorageDaemon(tmp_path) as backend:
        yield backend


def slice_of(mem: MemfdBackend, i: int, size: int = 64 * KiB) -> Entry:
    """The i-th ``size`` slice of ``mem``, placed at 1 GiB + its offset."""
    return MemRegion(GiB + i * size, size, mem.host_addr + i * size, i * size), mem.fd or -1


def table(*entries: Entry) -> Table:
    return {r.key: (r, fd) for r, fd in entries}


# -- negotiation ---------------------------------------------------------------------------------


def test_negotiation_in_qemus_order(fake: Callable[..., FakeBackend]) -> None:
    backend = fake()
    fe = VhostUserFrontend(Endpoint(backend.path))
    assert backend.log == NEGOTIATION
    # CONFIG is only for devices with a config space.
    assert backend.acked_protocol_features == MQ | ACK | SLOTS == fe.protocol_features
    assert fe.acked_features == (1 << F_VERSION_1) | (1 << F_PROTOCOL_FEATURES)
    assert (fe.max_mem_slots, fe.queue_num, fe.configure_mem_slots) == (32, 1, True)
    fe.close()
    fe = VhostUserFrontend(Endpoint(backend.path, config=True))
    assert fe.protocol_features == MQ | ACK | SLOTS | CONFIG
    fe.close()


@pytest.mark.parametrize(
    "knobs,endpoint,limit,log",
    [
        ({"max_mem_slots": 600}, {}, 512, NEGOTIATION),  # QEMU caps at 512
        ({"protocol_features": MQ | ACK}, {}, 8, NEGOTIATION[:-1]),
        ({}, {"protocol_features": ACK}, 8, NEGOTIATION[:5]),  # we decline MQ and the slots
        ({"features": 1 << F_VERSION_1}, {}, 8, ["GET_FEATURES", "SET_OWNER", "SET_FEATURES"]),
    ],
)
def test_limits(
    fake: Callable[..., FakeBackend],
    knobs: dict[str, int],
    endpoint: dict[str, int],
    limit: int,
    log: list[str],
) -> None:
    backend = fake(**knobs)
    fe = VhostUserFrontend(Endpoint(backend.path, **endpoint))  # type: ignore[arg-type]
    fe.close()
    # Without a request that gets a reply at the end, the last ones may still be in flight.
    backend.wait_session_end()
    assert fe.max_mem_slots == limit and backend.log == log


def test_negotiation_refusals(fake: Callable[..., FakeBackend]) -> None:
    legacy = fake(features=1 << F_PROTOCOL_FEATURES)
    with pytest.raises(VhostError, match="does not offer VIRTIO_F_VERSION_1"):
        VhostUserFrontend(Endpoint(legacy.path))
    assert legacy.log == ["GET_FEATURES"]  # refused before it could panic on SET_FEATURES
    no_config = fake(protocol_features=ACK | SLOTS)
    with pytest.raises(
        VhostError,
        match=r"^Device expects VHOST_USER_PROTOCOL_F_CONFIG but backend does not support it\.",
    ):
        VhostUserFrontend(Endpoint(no_config.path, config=True))
    with pytest.raises(
        VhostDisconnectedError, match="Failed to connect to '/nonexistent': No such"
    ):
        VhostUserFrontend(Endpoint("/nonexistent"))


# -- the memory table ----------------------------------------------------------------------------


def test_removals_first_then_additions_then_verification(
    fake: Callable[..., FakeBackend], memfd: MemfdBackend
) -> None:
    backend = fake()
    fe = VhostUserFrontend(Endpoint(backend.path))
    a, b, c = (slice_of(memfd, i) for i in range(3))
    assert fe.sync(table(a, b)) == 2
    assert backend.log[len(NEGOTIATION) :] == ["ADD_MEM_REG", "ADD_MEM_REG", "GET_FEATURES"]
    assert backend.table == [a[0].key, b[0].key] and set(fe.table) == {a[0].key, b[0].key}
    n = len(backend.log)
    assert fe.sync(table(c, b)) == 2
    assert backend.log[n:] == ["REM_MEM_REG", "ADD_MEM_REG", "GET_FEATURES"]
    assert backend.table == [b[0].key, c[0].key]
    n = len(backend.log)
    assert fe.sync(table(b, c)) == 0 and len(backend.log) == n  # nothing to do, nothing sent
    too_many = table(*(slice_of(memfd, i) for i in range(33)))
    with pytest.raises(VhostError, match="supports 32 memory regions, not 33"):
        fe.sync(too_many)
    assert len(backend.log) == n and not fe.connection.closed
    fe.close()


def test_set_mem_table_without_configure_mem_slots(
    fake: Callable[..., FakeBackend], memfd: MemfdBackend
) -> None:
    backend = fake(protocol_features=ACK)
    fe = VhostUserFrontend(Endpoint(backend.path))
    regions = [slice_of(memfd, i) for i in range(3)]
    assert fe.sync(table(*regions)) == 1
    assert backend.log[-2:] == ["SET_MEM_TABLE", "GET_FEATURES"]
    assert backend.table == [r.key for r, _ in regions]
    assert fe.sync(table(regions[1])) == 1 and backend.table == [regions[1][0].key]
    with pytest.raises(VhostError, match="supports 8 memory regions, not 9"):
        fe.sync(table(*(slice_of(memfd, i) for i in range(9))))
    assert backend.log[-1] == "GET_FEATURES"
    fe.close()


def test_failed_ack_ends_the_connection(
    fake: Callable[..., FakeBackend], memfd: MemfdBackend
) -> None:
    backend = fake(nack={Req.ADD_MEM_REG})
    fe = VhostUserFrontend(Endpoint(backend.path))
    with pytest.raises(VhostError, match=r"failed ADD_MEM_REG \(ack 1\)"):
        fe.sync(table(slice_of(memfd, 0)))
    assert fe.connection.closed and fe.table == {}


def test_a_lying_ack_is_caught_by_the_verification(
    fake: Callable[..., FakeBackend], memfd: MemfdBackend
) -> None:
    # Like libvhost-user 7.2: ack 0, then hang up.
    backend = fake(hang_up_after=len(NEGOTIATION) + 1)
    fe = VhostUserFrontend(Endpoint(backend.path))
    with pytest.raises(VhostDisconnectedError, match="GET_FEATURES"):
        fe.sync(table(slice_of(memfd, 0)))
    assert fe.table == {}


def test_a_hung_backend_times_out(fake: Callable[..., FakeBackend], memfd: MemfdBackend) -> None:
    backend = fake(mute_after=len(NEGOTIATION))
    fe = VhostUserFrontend(Endpoint(backend.path, timeout=0.2))
    with pytest.raises(VhostDisconnectedError, match="timed out"):
        fe.sync(table(slice_of(memfd, 0)))
    assert fe.connection.closed


def test_reconnect_refuses_a_lower_limit(fake: Callable[..., FakeBackend]) -> None:
    backend = fake()
    consumer = VhostUserConsumer("u0", Endpoint(backend.path))
    backend.max_mem_slots = 16
    backend.hang_up()
    assert consumer.check() is ConnectionState.DISCONNECTED
    with pytest.raises(VhostError) as info:
        consumer.reconnect()
    assert str(info.value).startswith(
        "The backend specified a max ram slots limit of 16, when the prior validated limit "
        "was 32. This limit should never decrease."
    )
    assert consumer.state is ConnectionState.DISCONNECTED and consumer.limit == 32
    backend.max_mem_slots = 40
    consumer.reconnect()
    assert consumer.connected and consumer.limit == 40 and backend.connections == 3
    backend.close()
    with pytest.raises(VhostDisconnectedError, match="Failed to connect"):
        consumer.reconnect()
    assert consumer.state is ConnectionState.DISCONNECTED
    consumer.close()
    with pytest.raises(VhostError, match="is closed"):
        consumer.reconnect()


# -- Debian's qemu-storage-daemon -----------------------------------------------------------------


@requires_qsd
def test_qsd_negotiates_32_slots(qsd: QemuStorageDaemon) -> None:
    fe = VhostUserFrontend(Endpoint(qsd.socket_path, config=True))
    assert fe.max_mem_slots == 32 and fe.protocol_features == MQ | ACK | CONFIG | SLOTS
    assert int.from_bytes(fe.get_config(60)[:8], "little") == qsd.disk.stat().st_size // 512
    fe.close()


@requires_qsd
def test_qsd_lies_in_its_ack(qsd: QemuStorageDaemon, memfd: MemfdBackend) -> None:
    fe = VhostUserFrontend(Endpoint(qsd.socket_path))
    fe.max_mem_slots = 64  # pretend it allowed more, to send it a 33rd region
    with pytest.raises(VhostDisconnectedError):
        fe.sync(table(*(slice_of(memfd, i) for i in range(33))))
    assert wait_until(lambda: "no free ram slots available" in qsd.log()) and qsd.alive()
    # It dropped the whole table with the connection.
    assert wait_until(lambda: memfd_mappings(qsd.pid) == [])
    fe = VhostUserFrontend(Endpoint(qsd.socket_path))  # and serves the next connection
    fe.sync(table(slice_of(memfd, 0)))
    assert [m.size for m in memfd_mappings(qsd.pid)] == [64 * KiB]
    fe.close()


@requires_qsd
def test_qsd_set_mem_table(qsd: QemuStorageDaemon, memfd: MemfdBackend) -> None:
    fe = VhostUserFrontend(Endpoint(qsd.socket_path, protocol_features=ACK))
    assert fe.max_mem_slots == 8 and not fe.configure_mem_slots
    fe.sync(table(*(slice_of(memfd, i) for i in range(1, 4))))
    # libvhost-user 7.2 maps each region from file offset 0 up to its end.
    assert sorted(m.size for m in memfd_mappings(qsd.pid)) == [128 * KiB, 192 * KiB, 256 * KiB]
    fe.sync(table(slice_of(memfd, 2)))
    assert [m.size for m in memfd_mappings(qsd.pid)] == [192 * KiB]
    fe.close()


# -- the consumer on a machine ---------------------------------------------------------------------


@requires_qsd
@pytest.mark.parametrize("how,memslots", [("dynamic-memslots=on", 1), ("memslot-size=1G", 8)])
def test_qsd_maps_exactly_the_mapped_memslots(
    qsd: QemuStorageDaemon, how: str, memslots: int
) -> None:
    with memfd_machine() as m:
        consumer = VhostUserConsumer("qsd0", Endpoint(qsd.socket_path))
        m.budget.attach_vhost(consumer)
        dev = add_virtio_mem(m, how)
        # 32 < 509: QEMU's decision gives one memslot; a fixed size is taken as it is.
        assert dev.nb_memslots == memslots
        for target in (0, 3 * GiB - 512 * MiB, 8 * GiB, GiB, 5 * GiB, 0):
            drive_to(dev, target)
            check_invariants(m, dev)
            assert_maps(qsd.pid, m, consumer)
            assert len(consumer.regions) == dev.mapped_memslots
        m.budget.detach_vhost(consumer)
        assert consumer.state is ConnectionState.CLOSED and m.budget.vhost_backends == []
        drive_to(dev, 2 * GiB)  # no longer listening: nothing to send
        assert consumer.regions == [] and wait_until(lambda: memfd_mappings(qsd.pid) == [])


@requires_qsd
def test_qsd_killed_mid_resize(qsd: QemuStorageDaemon, caplog: pytest.LogCaptureFixture) -> None:
    with memfd_machine() as m:
        consumer = VhostUserConsumer("qsd0", Endpoint(qsd.socket_path))
        m.budget.attach_vhost(consumer)
        dev = add_virtio_mem(m, "memslot-size=1G")
        guest = GuestMemory(m.address_space)
        drive_to(dev, 3 * GiB)
        guest.write(dev.addr + 2 * GiB + 123, b"still here")
        # Unplug memslot 1, so that growing again takes two requests.
        unplug = Request(ReqType.UNPLUG, dev.addr + GiB, GiB // dev.block_size).pack()
        assert Response.unpack(dev.handle_request(unplug)).type == Resp.ACK
        assert_maps(qsd.pid, m, consumer)
        statuses: list[int] = []
        dev.size_change_listeners.append(
            lambda d, size: None if statuses else statuses.append(qsd.kill())
        )
        with caplog.at_level(logging.WARNING, logger="memslots.vhost.user"):
            drive_to(dev, 6 * GiB)  # the first request maps memslot 1, then qsd dies
        assert statuses == [-9] and dev.size == 6 * GiB
        check_invariants(m, dev)
        assert consumer.state is ConnectionState.DISCONNECTED and consumer.disconnects == 1
        assert "ADD_MEM_REG" in (consumer.disconnect_reason or "")
        [record] = caplog.records
        assert record.name == "memslots.vhost.user" and record.levelno == logging.WARNING
        assert "vhost-user back-end 'qsd0' disconnected" in record.getMessage()
        assert len(consumer.regions) == 6 and consumer.frontend is not None
        assert consumer.frontend.table == {}  # a dead back-end holds nothing
        drive_to(dev, 2 * GiB)  # the machine carries on; unplugged memory is discarded
        check_invariants(m, dev)
        assert dev.memdev is not None
        fd = dev.memdev.memory.fd  # out of our reach now, but not of the memfd's
        assert fd is not None and os.pread(fd, 10, 2 * GiB + 123) == bytes(10)
        drive_to(dev, 4 * GiB)
        guest.write(dev.addr + 3 * GiB, b"written while disconnected")
        qsd.start()
        consumer.reconnect()
        assert consumer.connected
        assert_maps(qsd.pid, m, consumer)
        drive_to(dev, 7 * GiB)
        check_invariants(m, dev)
        assert_maps(qsd.pid, m, consumer)
        assert guest.read(dev.addr + 3 * GiB, 26) == b"written while disconnected"
        m.budget.detach_vhost(consumer)


@requires_qsd
def test_qsd_drops_the_connection_and_lives_on(qsd: QemuStorageDaemon) -> None:
    with memfd_machine() as m:
        consumer = VhostUserConsumer("qsd0", Endpoint(qsd.socket_path))
        m.budget.attach_vhost(consumer)
        dev = add_virtio_mem(m, "memslot-size=1G")
        drive_to(dev, 2 * GiB)
        # Make it fail: removing a region it does not hold is acked with 0, then it hangs up.
        assert consumer.frontend is not None
        bogus = MemRegion(0x1000, 0x1000, 0x1000, 0).pack()
        consumer.frontend.connection.send(Req.REM_MEM_REG, bytes(8) + bogus, need_reply=True)
        assert consumer.frontend.connection.recv_reply(Req.REM_MEM_REG) == bytes(8)
        assert consumer.check() is ConnectionState.DISCONNECTED
        assert wait_until(lambda: "Specified region not found" in qsd.log()) and qsd.alive()
        consumer.reconnect()  # the same process takes the new connection
        assert_maps(qsd.pid, m, consumer)
        m.budget.detach_vhost(consumer)


# -- Debian's virtiofsd --------------------------------------------------------------------------


@requires_virtiofsd
def test_virtiofsd_maps_dies_on_error_and_is_survived(tmp_path: Path) -> None:
    fs = Virtiofsd(tmp_path, sandbox="chroot")
    with fs, memfd_machine() as m:
        consumer = VhostUserConsumer("fs0", Endpoint(fs.socket_path))
        m.budget.attach_vhost(consumer)
        dev = add_virtio_mem(m, "memslot-size=1G")
        for target in (2 * GiB, 5 * GiB, GiB):
            drive_to(dev, target)
            assert_maps(fs.pid, m, consumer)
        assert consumer.frontend is not None
        bogus = MemRegion(0x1000, 0x1000, 0x1000, 0).pack()
        consumer.frontend.connection.send(Req.REM_MEM_REG, bytes(8) + bogus, need_reply=True)
        assert fs.wait() == 1  # virtiofsd exits on any error
        drive_to(dev, 3 * GiB)
        check_invariants(m, dev)
        assert consumer.state is ConnectionState.DISCONNECTED
        with pytest.raises(VhostDisconnectedError, match="Failed to connect"):
            consumer.reconnect()  # nobody is listening any more
        fs.restart()
        consumer.reconnect()
        assert_maps(fs.pid, m, consumer)
        m.budget.detach_vhost(consumer)
        assert fs.wait() == 0  # it serves one connection, and ends with it
    assert not os.path.exists(fs.pid_file)


@requires_virtiofsd
def test_virtiofsd_namespace_child_holds_the_memory(tmp_path: Path) -> None:
    fs = Virtiofsd(tmp_path, sandbox="namespace")
    with fs, memfd_machine() as m:
        consumer = VhostUserConsumer("fs0", Endpoint(fs.socket_path))
        m.budget.attach_vhost(consumer)
        dev = add_virtio_mem(m, "memslot-size=1G")
        drive_to(dev, 2 * GiB)
        assert fs.memory_pid != fs.pid
        assert_maps(fs.memory_pid, m, consumer)
        assert memfd_mappings(fs.pid) == []
        os.kill(fs.memory_pid, 9)
        assert consumer.check() is ConnectionState.DISCONNECTED
        drive_to(dev, 0)
        check_invariants(m, dev)
        m.budget.detach_vhost(consumer)
