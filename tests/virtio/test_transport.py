"""virtio-mem behind its transport: negotiation, config space, requests through the queue, and
every guest mistake ending in DEVICE_NEEDS_RESET with the plugged state untouched."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator

import pytest

from memslots.devices.virtio_mem.wire import (
    F_UNPLUGGED_INACCESSIBLE,
    BlockState,
    Config,
    ReqType,
    Request,
    Resp,
    Response,
)
from memslots.errors import DeviceError
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory
from memslots.options import parse_machine_config
from memslots.sizes import MiB
from memslots.virtio.transport import (
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VirtioMemTransport,
)
from memslots.virtio.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    AvailIndexError,
    BufferAddressError,
    DescriptorIndexError,
    DescriptorLoopError,
    DescriptorOrderError,
    DriverQueue,
    IndirectDescriptorError,
    QueueSetupError,
    RingAccessError,
)

BS = 2 * MiB
QUEUE = 0x1_0000
REQ = 0x10_0000
RESP = 0x10_1000
SCRATCH = 0x10_2000
RAM_END = 32 * MiB
ALL_OK = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK


class Guest:
    """A machine with the transport, and a guest that initialises it and sends requests."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.dev = machine.virtio_mem("vmem0")
        self.memory = GuestMemory(machine.address_space)
        self.interrupts = 0
        self.config_interrupts = 0
        self.t = VirtioMemTransport(
            self.dev,
            self.memory,
            interrupt=self._interrupt,
            config_interrupt=self._config_interrupt,
        )
        self.q = self.init()

    def _interrupt(self) -> None:
        self.interrupts += 1

    def _config_interrupt(self) -> None:
        self.config_interrupts += 1

    def init(self, num: int = 128, features: int | None = None) -> DriverQueue:
        """The virtio initialisation sequence; returns the driver's queue."""
        t = self.t
        t.write_status(0)
        t.write_status(STATUS_ACKNOWLEDGE)
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        t.write_driver_features(t.device_features if features is None else features)
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert t.status & STATUS_FEATURES_OK
        q = DriverQueue(self.memory, QUEUE, 0x8000, num=num, notify=t.notify)
        t.setup_queue(q.num, q.desc_gpa, q.avail_gpa, q.used_gpa)
        t.write_status(ALL_OK)
        self.q = q
        return q

    def send(
        self,
        req: bytes,
        *,
        out: tuple[int, ...] = (24,),
        in_: tuple[int, ...] = (10,),
        indirect: bool = False,
    ) -> Response | None:
        """Send ``req`` split over out buffers of the given sizes; the response over in ones."""
        self.memory.write(REQ, req)
        self.memory.write(RESP, b"\xee" * 64)
        outs = [(REQ + sum(out[:i]), n) for i, n in enumerate(out)]
        ins = [(RESP + sum(in_[:i]), n) for i, n in enumerate(in_)]
        self.q.add(outs, ins, indirect=indirect)
        self.q.kick()
        used = self.q.get_used()
        if used is None:
            return None
        assert used[1] == 10
        return Response.unpack(self.memory.read(RESP, 10))

    def request(self, kind: ReqType, block: int = 0, nb: int = 1) -> Response | None:
        return self.send(Request(kind, self.dev.addr + block * BS, nb).pack())

    def state(self) -> tuple[bytes, int, int, tuple[bool, ...], int]:
        dev = self.dev
        return (
            bytes(dev.bitmap),
            dev.size,
            dev.usable_region_size,
            tuple(m.mapped for m in dev.memslot_map()),
            len(self.machine.address_space.sections),
        )


def config(extra: str = ",memslot-size=8M,block-size=2M") -> Machine:
    return Machine(
        parse_machine_config(
            "32M,maxmem=1G",
            ["memory-backend-ram,id=mem0,size=32M,reserve=off"],
            [f"virtio-mem,id=vmem0,memdev=mem0,requested-size=16M{extra}"],
            accel="sim",
        )
    )


@pytest.fixture
def guest() -> Iterator[Guest]:
    with config() as m:
        yield Guest(m)


def test_features_offered(guest: Guest) -> None:
    assert guest.dev.unplugged_inaccessible == "on"
    expected = 1 << F_VERSION_1 | 1 << F_INDIRECT_DESC | 1 << F_UNPLUGGED_INACCESSIBLE
    assert guest.t.device_features == expected
    with config(",unplugged-inaccessible=off") as m:
        assert VirtioMemTransport(
            m.virtio_mem("vmem0"), GuestMemory(m.address_space)
        ).device_features == (1 << F_VERSION_1 | 1 << F_INDIRECT_DESC)


@pytest.mark.parametrize(
    ("drop", "add", "ok"),
    [
        (0, 0, True),
        (1 << F_INDIRECT_DESC, 0, True),
        (1 << F_VERSION_1, 0, False),
        (1 << F_UNPLUGGED_INACCESSIBLE, 0, False),
        (0, 1 << 0, False),  # ACPI_PXM is not offered
        (0, 1 << 63, False),
    ],
)
def test_feature_negotiation(guest: Guest, drop: int, add: int, ok: bool) -> None:
    t = guest.t
    t.write_status(0)
    t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    t.write_driver_features(t.device_features & ~drop | add)
    t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert bool(t.status & STATUS_FEATURES_OK) == ok
    assert t.status & (STATUS_ACKNOWLEDGE | STATUS_DRIVER) == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    if ok:
        before = t.driver_features
        t.write_driver_features(0)
        assert t.driver_features == before  # ignored after FEATURES_OK


def test_config_space_and_generation(guest: Guest) -> None:
    t, dev = guest.t, guest.dev
    assert t.read_config(0, 56) == dev.config().pack()
    assert Config.unpack(t.read_config(0, 56)).requested_size == 16 * MiB
    assert t.read_config(48, 8) == struct.pack("<Q", 16 * MiB)
    assert t.read_config(40, 4) == bytes(4)
    assert t.read_config(52, 8) == b"\xff" * 8
    assert t.read_config(-1, 2) == b"\xff\xff"
    gen = t.config_generation
    assert t.config_generation == gen
    guest.request(ReqType.PLUG, 0)
    # plugged_size changed: a new generation, but no notification (the spec's SHOULD NOT).
    assert t.config_generation == gen + 1
    assert guest.config_interrupts == 0
    assert t.read_config(40, 8) == struct.pack("<Q", BS)
    dev.set_requested_size(24 * MiB)
    assert guest.config_interrupts == 1
    assert t.config_generation == gen + 2
    dev.set_requested_size(24 * MiB)  # QEMU notifies even without a change
    assert guest.config_interrupts == 2
    assert t.config_generation == gen + 3


def test_config_interrupt_only_after_driver_ok(guest: Guest) -> None:
    t = guest.t
    t.write_status(0)
    gen = t.config_generation
    guest.dev.set_requested_size(20 * MiB)
    assert guest.config_interrupts == 0 and t.config_generation == gen + 1


@pytest.mark.parametrize("shape", ["simple", "split", "indirect"])
def test_all_request_types(guest: Guest, shape: str) -> None:
    kwargs: dict[str, object] = {}
    if shape == "split":
        kwargs = {"out": (2, 14, 8), "in_": (3, 7)}
    elif shape == "indirect":
        kwargs = {"out": (8, 16), "in_": (10,), "indirect": True}
    dev = guest.dev

    def send(kind: ReqType, block: int, nb: int) -> Response | None:
        return guest.send(Request(kind, dev.addr + block * BS, nb).pack(), **kwargs)  # type: ignore[arg-type]

    assert send(ReqType.PLUG, 2, 3) == Response(Resp.ACK)
    assert dev.bitmap[:6] == b"\x00\x00\x01\x01\x01\x00"
    assert send(ReqType.STATE, 0, 4) == Response(Resp.ACK, BlockState.MIXED)
    assert send(ReqType.STATE, 2, 3) == Response(Resp.ACK, BlockState.PLUGGED)
    assert send(ReqType.PLUG, 3, 1) == Response(Resp.ERROR)
    assert send(ReqType.PLUG, 5, 8) == Response(Resp.NACK)
    assert send(ReqType.UNPLUG, 2, 1) == Response(Resp.ACK)
    assert send(ReqType.UNPLUG_ALL, 0, 0) == Response(Resp.ACK)
    assert dev.size == 0 and dev.bitmap.count(1) == 0
    assert guest.interrupts == 7
    assert guest.t.queue is not None and guest.t.queue.used_idx == 7


def test_response_and_used_ring_bytes(guest: Guest) -> None:
    q = guest.q
    guest.memory.write(REQ, Request(ReqType.STATE, guest.dev.addr, 1).pack())
    guest.memory.write(RESP, b"\xee" * 16)
    head = q.add([(REQ, 24)], [(RESP, 16)])
    q.kick()
    # Type STATE answer: ACK, padding zero, state UNPLUGGED; bytes past the 10 untouched.
    assert guest.memory.read(RESP, 16) == struct.pack("<H6xH", 0, 1) + b"\xee" * 6
    assert guest.memory.read(q.used_gpa, 12) == struct.pack("<HHII", 0, 1, head, 10)


def test_many_chains_in_one_notify_and_no_interrupt(guest: Guest) -> None:
    q, mem, dev = guest.q, guest.memory, guest.dev
    q.suppress_interrupts(True)
    for i in range(5):
        mem.write(REQ + 32 * i, Request(ReqType.PLUG, dev.addr + i * BS, 1).pack())
        q.add([(REQ + 32 * i, 24)], [(RESP + 16 * i, 10)])
    q.kick()
    assert dev.bitmap[:5] == b"\x01" * 5
    assert guest.interrupts == 0
    assert [q.get_used() for _ in range(6)][5] is None
    for i in range(5):
        assert Response.unpack(mem.read(RESP + 16 * i, 10)) == Response(Resp.ACK)
    q.suppress_interrupts(False)
    assert guest.request(ReqType.STATE, 0, 5) == Response(Resp.ACK, BlockState.PLUGGED)
    assert guest.interrupts == 1


def test_request_listeners(guest: Guest) -> None:
    seen: list[tuple[Request, Response]] = []
    guest.t.request_listeners.append(lambda req, resp: seen.append((req, resp)))
    guest.request(ReqType.PLUG, 1)
    assert seen == [(Request(ReqType.PLUG, guest.dev.addr + BS, 1), Response(Resp.ACK))]


def test_nothing_is_processed_before_driver_ok(guest: Guest) -> None:
    t, q = guest.t, guest.q
    t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    guest.memory.write(REQ, Request(ReqType.PLUG, guest.dev.addr, 1).pack())
    q.add([(REQ, 24)], [(RESP, 10)])
    q.kick()
    assert q.get_used() is None and guest.dev.size == 0
    t.write_status(ALL_OK)
    t.notify()
    assert q.get_used() is not None and guest.dev.size == BS
    t.write_status(ALL_OK | STATUS_FAILED)
    guest.memory.write(REQ, Request(ReqType.PLUG, guest.dev.addr + BS, 1).pack())
    q.add([(REQ, 24)], [(RESP, 10)])
    q.kick()
    assert q.get_used() is None and guest.dev.size == BS


def test_device_needs_reset_is_not_writable_by_the_driver(guest: Guest) -> None:
    guest.t.write_status(ALL_OK | STATUS_DEVICE_NEEDS_RESET)
    assert guest.t.status == ALL_OK
    assert guest.request(ReqType.STATE) is not None


# -- every guest mistake: DEVICE_NEEDS_RESET, nothing changed, element not returned -----------

Corruptor = Callable[[Guest], None]


def raw_desc(g: Guest, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
    g.memory.write(g.q.desc_gpa + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def publish(g: Guest, head: int, idx_step: int = 1) -> None:
    """Publish ``head`` behind the driver's back (the device has seen ``used_idx`` so far)."""
    assert g.t.queue is not None
    idx = g.t.queue.last_avail_idx
    g.memory.write(g.q.avail_gpa + 4 + 2 * (idx % 128), struct.pack("<H", head))
    g.memory.write(g.q.avail_gpa + 2, struct.pack("<H", (idx + idx_step) & 0xFFFF))


def chain_with(g: Guest, *descs: tuple[int, int, int, int], req: bytes = b"") -> None:
    """``req`` (default: PLUG of block 6) in REQ, and descriptors 10.. as given (addr, len,
    flags, next), published."""
    g.memory.write(REQ, req or Request(ReqType.PLUG, g.dev.addr + 6 * BS, 1).pack())
    for i, (addr, length, flags, nxt) in enumerate(descs):
        raw_desc(g, 10 + i, addr, length, flags, nxt)
    publish(g, 10)


def plug_request(g: Guest, req: bytes, out: int = 24, in_: int = 10) -> None:
    chain_with(g, (REQ, out, DESC_F_NEXT, 11), (RESP, in_, DESC_F_WRITE, 0), req=req)


def in_unmapped_memslot(g: Guest) -> None:
    # Memslot 1 (blocks 4-7) has nothing plugged, so it is not mapped.
    chain_with(g, (REQ, 24, DESC_F_NEXT, 11), (g.dev.addr + 4 * BS, 10, DESC_F_WRITE, 0))


def last_descriptor_bad(g: Guest) -> None:
    # A complete, valid PLUG with its response buffer, then one more buffer outside RAM: the
    # request must not be executed.
    chain_with(
        g,
        (REQ, 24, DESC_F_NEXT, 11),
        (RESP, 10, DESC_F_WRITE | DESC_F_NEXT, 12),
        (RAM_END, 10, DESC_F_WRITE, 0),
    )


def ring_outside_ram(g: Guest) -> None:
    g.t.write_status(0)
    g.t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    g.t.write_driver_features(g.t.device_features)
    g.t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    g.t.setup_queue(128, g.q.desc_gpa, g.q.avail_gpa, RAM_END - 16)
    g.t.write_status(ALL_OK)
    publish(g, 0)


CASES: list[tuple[str, Corruptor, type[Exception], str]] = [
    (
        "loop",
        lambda g: chain_with(g, (REQ, 24, DESC_F_NEXT, 11), (REQ, 24, DESC_F_NEXT, 10)),
        DescriptorLoopError,
        "looped",
    ),
    (
        "out after in",
        lambda g: chain_with(g, (RESP, 10, DESC_F_WRITE | DESC_F_NEXT, 11), (REQ, 24, 0, 0)),
        DescriptorOrderError,
        "after a device-writable",
    ),
    ("head >= num", lambda g: publish(g, 128), DescriptorIndexError, "index 128"),
    (
        "next >= num",
        lambda g: chain_with(g, (REQ, 24, DESC_F_NEXT, 200)),
        DescriptorIndexError,
        "next is 200",
    ),
    (
        "address outside RAM",
        lambda g: chain_with(g, (RAM_END - 4, 24, 0, 0)),
        BufferAddressError,
        "not guest RAM",
    ),
    ("address in an unmapped memslot", in_unmapped_memslot, BufferAddressError, "not guest RAM"),
    ("bad buffer after a valid request", last_descriptor_bad, BufferAddressError, "0x2000000"),
    (
        "indirect with next",
        lambda g: chain_with(g, (SCRATCH, 32, DESC_F_INDIRECT | DESC_F_NEXT, 1)),
        IndirectDescriptorError,
        "NEXT",
    ),
    (
        "indirect length",
        lambda g: chain_with(g, (SCRATCH, 24, DESC_F_INDIRECT, 0)),
        IndirectDescriptorError,
        "size",
    ),
    (
        "indirect table outside RAM",
        lambda g: chain_with(g, (RAM_END - 16, 32, DESC_F_INDIRECT, 0)),
        IndirectDescriptorError,
        "cannot map",
    ),
    (
        "short request",
        lambda g: plug_request(g, Request(ReqType.PLUG, g.dev.addr + 6 * BS, 1).pack(), out=23),
        DeviceError,
        "invalid request size: 23",
    ),
    (
        "short response buffer",
        lambda g: plug_request(g, Request(ReqType.PLUG, g.dev.addr + 6 * BS, 1).pack(), in_=9),
        DeviceError,
        "not enough space for response: 9",
    ),
    (
        "unknown type",
        lambda g: plug_request(g, Request(4, g.dev.addr + 6 * BS, 1).pack()),
        DeviceError,
        "unknown request type: 4",
    ),
    ("avail idx jump", lambda g: publish(g, 0, idx_step=129), AvailIndexError, "from 3 to 132"),
    ("used ring outside RAM", ring_outside_ram, RingAccessError, "used ring"),
]


@pytest.mark.parametrize(("name", "corrupt", "error", "match"), CASES, ids=[c[0] for c in CASES])
def test_guest_mistakes_need_reset_and_change_nothing(
    guest: Guest, name: str, corrupt: Corruptor, error: type[Exception], match: str
) -> None:
    for block in (0, 3, 9):
        assert guest.request(ReqType.PLUG, block) == Response(Resp.ACK)
    before = guest.state()
    used_before = guest.t.queue.used_idx if guest.t.queue else 0
    config_irqs = guest.config_interrupts
    corrupt(guest)
    guest.t.notify()
    t = guest.t
    assert t.status & STATUS_DEVICE_NEEDS_RESET
    assert guest.dev.needs_reset
    assert isinstance(t.error, error)
    assert re.search(match, str(t.error)), str(t.error)
    assert guest.config_interrupts == config_irqs + 1
    assert guest.state() == before
    assert guest.dev.bitmap[6] == 0  # the PLUG in the bad chain never ran
    queue = t.queue
    assert queue is not None
    assert queue.used_idx == (0 if name == "used ring outside RAM" else used_before)
    assert guest.q.get_used() is None  # the element is not returned
    # Nothing more is processed until a reset ...
    t.notify()
    assert guest.state() == before
    # ... which brings the device back, plugged blocks intact.
    guest.init()
    assert not guest.dev.needs_reset and not t.status & STATUS_DEVICE_NEEDS_RESET
    assert t.error is None
    assert guest.request(ReqType.STATE, 0, 1) == Response(Resp.ACK, BlockState.PLUGGED)
    assert guest.request(ReqType.STATE, 9, 1) == Response(Resp.ACK, BlockState.PLUGGED)
    assert guest.state() == before


def test_a_good_chain_before_a_bad_one_completes(guest: Guest) -> None:
    q, mem, dev = guest.q, guest.memory, guest.dev
    mem.write(REQ, Request(ReqType.PLUG, dev.addr, 1).pack())
    q.add([(REQ, 24)], [(RESP, 10)])
    raw_desc(guest, 100, RAM_END, 24)
    mem.write(q.avail_gpa + 4 + 2, struct.pack("<H", 100))
    mem.write(q.avail_gpa + 2, struct.pack("<H", 2))
    q.kick()
    assert dev.bitmap[0] == 1 and guest.t.status & STATUS_DEVICE_NEEDS_RESET
    assert q.get_used() is not None and q.get_used() is None


@pytest.mark.parametrize(
    ("when", "num", "used_off", "error"),
    [
        ("before features", 128, 0, "before FEATURES_OK"),
        ("after driver ok", 128, 0, "after DRIVER_OK"),
        ("too big", 256, 0, "power of two in"),
        ("not a power of two", 100, 0, "power of two in"),
        ("misaligned", 128, 2, "aligned"),
    ],
)
def test_bad_queue_setup_needs_reset(
    guest: Guest, when: str, num: int, used_off: int, error: str
) -> None:
    t, q = guest.t, guest.q
    t.write_status(0)
    t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    if when != "before features":
        t.write_driver_features(t.device_features)
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    if when == "after driver ok":
        t.write_status(ALL_OK)
    t.setup_queue(num, q.desc_gpa, q.avail_gpa, q.used_gpa + used_off)
    assert t.status & STATUS_DEVICE_NEEDS_RESET
    assert isinstance(t.error, QueueSetupError) and error in str(t.error)


def test_device_reset_keeps_blocks_and_forgets_the_queue(guest: Guest) -> None:
    guest.request(ReqType.PLUG, 1)
    before = guest.state()
    t = guest.t
    t.write_status(0)
    assert t.status == 0 and t.queue is None and t.driver_features == 0
    assert guest.state() == before
    t.notify()  # no queue: nothing happens, nothing raises
    guest.init()
    assert guest.request(ReqType.STATE, 1) == Response(Resp.ACK, BlockState.PLUGGED)


def _queue_in_device_memory(guest: Guest, block: int) -> DriverQueue:
    """The driver's queue moved into the device's plugged ``block``."""
    t = guest.t
    assert guest.request(ReqType.PLUG, block) == Response(Resp.ACK)
    t.write_status(0)
    t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    t.write_driver_features(t.device_features)
    t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    q = DriverQueue(guest.memory, guest.dev.addr + block * BS, 0x8000, notify=t.notify)
    t.setup_queue(q.num, q.desc_gpa, q.avail_gpa, q.used_gpa)
    t.write_status(ALL_OK)
    return q


def test_request_that_would_unplug_its_own_used_ring_is_refused(guest: Guest) -> None:
    """Its answer would go into memory the request makes PROT_NONE: a protocol violation,
    refused before the request runs, so nothing changes."""
    dev, mem, t = guest.dev, guest.memory, guest.t
    q = _queue_in_device_memory(guest, 12)
    before = guest.state()
    mem.write(REQ, Request(ReqType.UNPLUG, dev.addr + 12 * BS, 1).pack())
    q.add([(REQ, 24)], [(RESP, 10)])
    q.kick()
    assert guest.state() == before and dev.size == BS
    assert t.queue is not None and t.queue.used_idx == 0
    assert isinstance(t.error, DeviceError) and "descriptor table out of reach" in str(t.error)
    assert t.status & STATUS_DEVICE_NEEDS_RESET


def test_unplug_all_that_would_unplug_its_own_response_is_refused(guest: Guest) -> None:
    dev, mem, t = guest.dev, guest.memory, guest.t
    assert guest.request(ReqType.PLUG, 3) == Response(Resp.ACK)
    resp = dev.addr + 3 * BS + 0x100
    mem.write(REQ, Request(ReqType.UNPLUG_ALL, 0, 0).pack())
    guest.q.add([(REQ, 24)], [(resp, 10)])
    guest.q.kick()
    assert dev.size == BS and dev.bitmap[3] == 1
    assert "response buffer out of reach" in str(t.error)


def test_request_that_unplugs_its_own_used_ring_without_protection() -> None:
    """``unplugged-inaccessible=off`` (one memslot, always mapped): the request completes as
    in QEMU and the answer lands in the unplugged block; the ring was discarded with it, so
    the device then finds its index gone back to 0."""
    with config(",block-size=2M,unplugged-inaccessible=off") as m:
        guest = Guest(m)
        dev, mem, t = guest.dev, guest.memory, guest.t
        q = _queue_in_device_memory(guest, 12)
        mem.write(REQ, Request(ReqType.UNPLUG, dev.addr + 12 * BS, 1).pack())
        head = q.add([(REQ, 24)], [(RESP, 10)])
        q.kick()
        assert dev.size == 0
        assert Response.unpack(mem.read(RESP, 10)) == Response(Resp.ACK)
        assert mem.read(q.used_gpa, 8) == struct.pack("<HHI", 0, 1, head)
        assert isinstance(t.error, AvailIndexError)


def test_close_stops_config_notifications(guest: Guest) -> None:
    guest.t.close()
    guest.dev.set_requested_size(20 * MiB)
    assert guest.config_interrupts == 0
