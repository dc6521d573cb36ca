"""The split virtqueue: ring layout, chain validation as QEMU does it, and the guest's side."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.devices.virtio_mem.wire import ReqType, Request
from memslots.errors import AddressSpaceError, DeviceError
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory
from memslots.options import parse_machine_config
from memslots.sizes import MiB
from memslots.virtio.virtqueue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_CHAIN_BUFFERS,
    USED_F_NO_NOTIFY,
    AvailIndexError,
    BufferAddressError,
    DescriptorIndexError,
    DescriptorLoopError,
    DescriptorOrderError,
    DriverQueue,
    DriverQueueError,
    IndirectDescriptorError,
    QueueSetupError,
    RingAccessError,
    VirtQueue,
    VirtQueueError,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

NUM = 16
DESC = 0x1_0000
AVAIL = DESC + desc_table_size(NUM)
USED = 0x1_1000
BUF = 0x10_0000
RAM_END = 32 * MiB
#: The DIMM (16 MiB at 4 GiB) is followed directly by the virtio-mem device (8 MiB memslots).
DIMM = 0x1_0000_0000
DIMM_END = DIMM + 16 * MiB


@pytest.fixture
def machine() -> Iterator[Machine]:
    config = parse_machine_config(
        "32M,slots=1,maxmem=1G",
        [
            "memory-backend-ram,id=d0,size=16M,reserve=off",
            "memory-backend-ram,id=mem0,size=32M,reserve=off",
        ],
        [
            "pc-dimm,id=dimm0,memdev=d0",
            "virtio-mem,id=vmem0,memdev=mem0,memslot-size=8M,block-size=2M,requested-size=32M",
        ],
        accel="sim",
    )
    with Machine(config) as m:
        yield m


@pytest.fixture
def memory(machine: Machine) -> GuestMemory:
    return GuestMemory(machine.address_space)


def vmem(machine: Machine) -> VirtioMem:
    return machine.virtio_mem("vmem0")


def plug(dev: VirtioMem, block: int) -> None:
    assert dev.execute(Request(ReqType.PLUG, dev.addr + block * dev.block_size, 1)).type == 0


class Raw:
    """The guest writing ring bytes by hand, so that they can be wrong."""

    def __init__(self, memory: GuestMemory, num: int = NUM, avail: int = AVAIL) -> None:
        self.memory = memory
        self.num = num
        self.avail = avail
        memory.write(DESC, bytes(desc_table_size(num)))
        memory.write(avail, bytes(avail_ring_size(num)))
        memory.write(USED, bytes(used_ring_size(num)))
        self.idx = 0

    def desc(
        self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC
    ) -> None:
        self.memory.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, *heads: int, idx: int | None = None) -> None:
        for head in heads:
            slot = self.avail + 4 + 2 * (self.idx % self.num)
            self.memory.write(slot, struct.pack("<H", head))
            self.idx = (self.idx + 1) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.idx if idx is None else idx))

    def queue(self, **kwargs: Any) -> VirtQueue:
        return VirtQueue(self.memory, self.num, DESC, self.avail, USED, **kwargs)


def test_ring_sizes() -> None:
    assert (desc_table_size(128), avail_ring_size(128), used_ring_size(128)) == (2048, 262, 1030)


@pytest.mark.parametrize(
    ("num", "desc", "avail", "used", "max_size"),
    [
        (0, DESC, AVAIL, USED, 32768),
        (3, DESC, AVAIL, USED, 32768),
        (65536, DESC, AVAIL, USED, 65536),
        (256, DESC, AVAIL, USED, 128),
        (NUM, DESC + 8, AVAIL, USED, 32768),
        (NUM, DESC, AVAIL + 1, USED, 32768),
        (NUM, DESC, AVAIL, USED + 2, 32768),
        (NUM, DESC, AVAIL, (1 << 64) - 16, 32768),
    ],
)
def test_bad_queue_setup(
    memory: GuestMemory, num: int, desc: int, avail: int, used: int, max_size: int
) -> None:
    with pytest.raises(QueueSetupError):
        VirtQueue(memory, num, desc, avail, used, max_size=max_size)


def test_errors_are_device_errors() -> None:
    assert issubclass(VirtQueueError, DeviceError)
    for cls in (RingAccessError, AvailIndexError, DescriptorLoopError, IndirectDescriptorError):
        assert issubclass(cls, VirtQueueError)


def test_driver_layout_and_descriptor_bytes(memory: GuestMemory) -> None:
    memory.write(0x2_0000, b"\xaa" * 0x4000)
    q = DriverQueue(memory, 0x2_0008, 0x4000 - 8, num=NUM)
    assert q.desc_gpa == 0x2_0010  # 16-byte aligned
    assert q.avail_gpa == q.desc_gpa + 16 * NUM
    assert q.used_gpa % 4 == 0 and q.used_gpa >= q.avail_gpa + avail_ring_size(NUM)
    assert memory.read(q.avail_gpa, 4) == bytes(4) and memory.read(q.used_gpa, 4) == bytes(4)
    head = q.add([(BUF, 24), (BUF + 64, 8)], [(BUF + 128, 10)])
    descs = [struct.unpack("<QIHH", memory.read(q.desc_gpa + 16 * i, 16)) for i in range(NUM)]
    first = descs[head]
    assert first == (BUF, 24, DESC_F_NEXT, first[3])
    second = descs[first[3]]
    assert second == (BUF + 64, 8, DESC_F_NEXT, second[3])
    assert descs[second[3]] == (BUF + 128, 10, DESC_F_WRITE, 0)
    assert memory.read(q.avail_gpa, 6) == struct.pack("<HHH", 0, 1, head)
    assert q.num_free == NUM - 3


def test_round_trip_is_byte_exact(memory: GuestMemory) -> None:
    notified: list[int] = []
    interrupts: list[int] = []
    q = DriverQueue(memory, DESC, 0x4000, num=NUM, notify=lambda: notified.append(1))
    vq = VirtQueue(
        memory, NUM, q.desc_gpa, q.avail_gpa, q.used_gpa, interrupt=lambda: interrupts.append(1)
    )
    assert vq.pop() is None
    memory.write(BUF, b"0123456789abcdef")
    head = q.add([(BUF, 10), (BUF + 10, 6)], [(BUF + 0x100, 4), (BUF + 0x200, 8)])
    q.kick()
    assert notified == [1]
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert chain.out == [(BUF, 10), (BUF + 10, 6)] and chain.out_len == 16
    assert chain.in_ == [(BUF + 0x100, 4), (BUF + 0x200, 8)] and chain.in_len == 12
    assert chain.read_out(12) == b"0123456789ab"
    assert chain.read_out(99) == b"0123456789abcdef"
    assert chain.write_in(b"ABCDEFGHIJKLMN") == 12
    assert memory.read(BUF + 0x100, 5) == b"ABCD\x00"
    assert memory.read(BUF + 0x200, 9) == b"EFGHIJKL\x00"
    assert vq.pop() is None
    vq.push(head, 12)
    assert interrupts == [1]
    assert memory.read(q.used_gpa, 12) == struct.pack("<HHII", 0, 1, head, 12)
    assert q.get_used() == (head, 12)
    assert q.get_used() is None
    assert q.num_free == NUM


def test_no_interrupt_and_no_notify(memory: GuestMemory) -> None:
    notified: list[int] = []
    interrupts: list[int] = []
    q = DriverQueue(memory, DESC, 0x4000, num=NUM, notify=lambda: notified.append(1))
    vq = VirtQueue(
        memory, NUM, q.desc_gpa, q.avail_gpa, q.used_gpa, interrupt=lambda: interrupts.append(1)
    )
    q.suppress_interrupts(True)
    assert memory.read(q.avail_gpa, 2) == struct.pack("<H", AVAIL_F_NO_INTERRUPT)
    head = q.add([(BUF, 4)], [])
    memory.write(q.used_gpa, struct.pack("<H", USED_F_NO_NOTIFY))
    q.kick()
    assert notified == []
    chain = vq.pop()
    assert chain is not None
    vq.push(chain.head, 0)
    assert interrupts == []
    assert q.get_used() == (head, 0)
    q.suppress_interrupts(False)
    q.add([(BUF, 4)], [])
    chain = vq.pop()
    assert chain is not None
    vq.push(chain.head, 0)
    assert interrupts == [1]


def test_indirect_chain(memory: GuestMemory) -> None:
    q = DriverQueue(memory, DESC, 0x4000, num=NUM)
    assert q.indirect_capacity > 3
    memory.write(BUF, b"request!")
    head = q.add([(BUF, 4), (BUF + 4, 4)], [(BUF + 0x100, 10)], indirect=True)
    assert q.num_free == NUM - 1
    raw = struct.unpack("<QIHH", memory.read(q.desc_gpa + 16 * head, 16))
    assert raw[1:] == (48, DESC_F_INDIRECT, 0)
    vq = VirtQueue(memory, NUM, q.desc_gpa, q.avail_gpa, q.used_gpa)
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert chain.out == [(BUF, 4), (BUF + 4, 4)] and chain.in_ == [(BUF + 0x100, 10)]
    assert chain.read_out(8) == b"request!"
    vq.push(head, 10)
    assert q.get_used() == (head, 10)
    assert q.num_free == NUM
    # The same chain on a device that did not negotiate VIRTIO_F_INDIRECT_DESC.
    q.add([(BUF, 4)], [], indirect=True)
    vq.indirect = False
    with pytest.raises(IndirectDescriptorError, match="VIRTIO_F_INDIRECT_DESC"):
        vq.pop()


def test_direct_chain_may_end_in_an_indirect_table(memory: GuestMemory) -> None:
    raw = Raw(memory)
    raw.desc(3, BUF, 8, DESC_F_NEXT, 5)
    raw.desc(5, BUF + 0x1000, 32, DESC_F_INDIRECT)
    raw.desc(0, BUF + 8, 8, DESC_F_NEXT, 1, table=BUF + 0x1000)
    raw.desc(1, BUF + 0x100, 10, DESC_F_WRITE, table=BUF + 0x1000)
    raw.publish(3)
    chain = raw.queue().pop()
    assert chain is not None
    assert chain.out == [(BUF, 8), (BUF + 8, 8)] and chain.in_ == [(BUF + 0x100, 10)]


def corrupt_cases() -> list[tuple[str, type[VirtQueueError], str]]:
    return [
        ("head beyond the table", DescriptorIndexError, "index 16 is available"),
        ("next beyond the table", DescriptorIndexError, "next is 16"),
        ("loop", DescriptorLoopError, "looped"),
        ("out after in", DescriptorOrderError, "after a device-writable"),
        ("zero length", BufferAddressError, "zero sized"),
        ("gap after boot RAM", BufferAddressError, "not guest RAM"),
        ("straddles the end of RAM", BufferAddressError, "not guest RAM"),
        ("past 64 bits", BufferAddressError, "not guest RAM"),
        ("unmapped device memslot", BufferAddressError, "not guest RAM"),
        ("avail idx jump", AvailIndexError, "from 0 to 17"),
        ("indirect with next", IndirectDescriptorError, "NEXT"),
        ("indirect length zero", IndirectDescriptorError, "size for indirect"),
        ("indirect length not x16", IndirectDescriptorError, "size for indirect"),
        ("nested indirect", IndirectDescriptorError, "inside an indirect"),
        ("indirect table outside RAM", IndirectDescriptorError, "cannot map"),
        ("indirect table across sections", IndirectDescriptorError, "crosses"),
        ("indirect loop", DescriptorLoopError, "looped"),
        ("indirect next beyond table", DescriptorIndexError, r"next is 2 \(table of 2\)"),
        ("too many buffers", DescriptorLoopError, f"over {MAX_CHAIN_BUFFERS}"),
    ]


@pytest.mark.parametrize(("case", "error", "match"), corrupt_cases())
def test_malformed_chains_are_refused(
    machine: Machine, memory: GuestMemory, case: str, error: type[VirtQueueError], match: str
) -> None:
    raw = Raw(memory)
    table = BUF + 0x1000
    head = 2
    dev = vmem(machine)
    plug(dev, 0)  # memslot 0 of the device mapped; memslot 1 not
    if case == "head beyond the table":
        head = NUM
    elif case == "next beyond the table":
        raw.desc(2, BUF, 24, DESC_F_NEXT, NUM)
    elif case == "loop":
        raw.desc(2, BUF, 24, DESC_F_NEXT, 7)
        raw.desc(7, BUF, 24, DESC_F_NEXT, 2)
    elif case == "out after in":
        raw.desc(2, BUF, 10, DESC_F_WRITE | DESC_F_NEXT, 3)
        raw.desc(3, BUF + 0x100, 24)
    elif case == "zero length":
        raw.desc(2, BUF, 24, DESC_F_NEXT, 3)
        raw.desc(3, BUF + 0x100, 0, DESC_F_WRITE)
    elif case == "gap after boot RAM":
        raw.desc(2, RAM_END + 0x1000, 24)
    elif case == "straddles the end of RAM":
        raw.desc(2, RAM_END - 8, 24)
    elif case == "past 64 bits":
        raw.desc(2, (1 << 64) - 8, 0xFFFF_FFFF)
    elif case == "unmapped device memslot":
        raw.desc(2, dev.addr + 8 * MiB + 0x100, 10, DESC_F_WRITE)
    elif case == "avail idx jump":
        raw.publish(2, idx=NUM + 1)
    elif case == "indirect with next":
        raw.desc(2, table, 32, DESC_F_INDIRECT | DESC_F_NEXT, 3)
    elif case == "indirect length zero":
        raw.desc(2, table, 0, DESC_F_INDIRECT)
    elif case == "indirect length not x16":
        raw.desc(2, table, 40, DESC_F_INDIRECT)
    elif case == "nested indirect":
        raw.desc(2, table, 32, DESC_F_INDIRECT)
        raw.desc(0, table + 0x100, 16, DESC_F_INDIRECT, table=table)
    elif case == "indirect table outside RAM":
        raw.desc(2, RAM_END - 16, 32, DESC_F_INDIRECT)
    elif case == "indirect table across sections":
        raw.desc(2, DIMM_END - 16, 32, DESC_F_INDIRECT)
    elif case == "indirect loop":
        raw.desc(2, table, 32, DESC_F_INDIRECT)
        raw.desc(0, BUF, 24, DESC_F_NEXT, 1, table=table)
        raw.desc(1, BUF, 24, DESC_F_NEXT, 0, table=table)
    elif case == "indirect next beyond table":
        raw.desc(2, table, 32, DESC_F_INDIRECT)
        raw.desc(0, BUF, 24, DESC_F_NEXT, 2, table=table)
    elif case == "too many buffers":
        entries = MAX_CHAIN_BUFFERS + 1
        raw.desc(2, table, 16 * entries, DESC_F_INDIRECT)
        memory.write(
            table,
            b"".join(struct.pack("<QIHH", BUF, 1, DESC_F_NEXT, i + 1) for i in range(entries)),
        )
    if case != "avail idx jump":
        raw.publish(head)
    vq = raw.queue()
    with pytest.raises(error, match=match):
        vq.pop()
    assert vq.inflight == 0


def test_indirect_loop_needs_the_table_size_not_the_queue_size(memory: GuestMemory) -> None:
    """A loop in a 2-entry indirect table is caught after 2 descriptors, not after ``num``."""
    raw = Raw(memory)
    raw.desc(0, BUF + 0x1000, 32, DESC_F_INDIRECT)
    raw.desc(0, BUF, 1, DESC_F_NEXT, 1, table=BUF + 0x1000)
    raw.desc(1, BUF, 1, DESC_F_NEXT, 0, table=BUF + 0x1000)
    raw.publish(0)
    with pytest.raises(DescriptorLoopError):
        raw.queue().pop()


def test_rings_must_be_ram_in_one_section(machine: Machine, memory: GuestMemory) -> None:
    with pytest.raises(RingAccessError, match="descriptor table"):
        VirtQueue(memory, NUM, RAM_END, AVAIL, USED).pop()
    with pytest.raises(RingAccessError, match="available ring"):
        VirtQueue(memory, NUM, DESC, RAM_END - 8, USED).pop()
    # The used ring across the DIMM / virtio-mem boundary: both mapped, still refused (QEMU
    # maps each ring as one piece).
    plug(vmem(machine), 0)
    used = DIMM_END - 64
    assert memory.is_ram(used, used_ring_size(NUM))
    with pytest.raises(RingAccessError, match=r"used ring.*crosses"):
        VirtQueue(memory, NUM, DESC, AVAIL, used).pop()


def test_buffers_may_span_sections_and_backends(machine: Machine, memory: GuestMemory) -> None:
    dev = vmem(machine)
    plug(dev, 3)  # end of memslot 0
    plug(dev, 4)  # start of memslot 1: a separate section of the same backend
    across_slots = dev.addr + 8 * MiB - 5
    plug(dev, 0)
    across_backends = DIMM_END - 7  # DIMM, then the device's first block
    assert dev.addr == DIMM_END
    memory.write(across_slots, b"0123456789")
    memory.write(across_backends, b"abcdefghijklmn")
    raw = Raw(memory)
    raw.desc(0, across_backends, 14, DESC_F_NEXT, 1)
    raw.desc(1, across_slots, 10, DESC_F_WRITE)
    raw.publish(0)
    chain = raw.queue().pop()
    assert chain is not None
    assert chain.read_out(14) == b"abcdefghijklmn"
    assert chain.read_out(9) == b"abcdefghi"
    assert chain.write_in(b"ZYXWVUTSRQ") == 10
    assert memory.read(across_slots, 10) == b"ZYXWVUTSRQ"


def test_guest_memory_ranges(machine: Machine, memory: GuestMemory) -> None:
    dev = vmem(machine)
    plug(dev, 0)
    ranges = memory.ranges(DIMM_END - 8, 16)
    assert [(s.name, off, n) for s, off, n in ranges] == [
        ("d0", 16 * MiB - 8, 8),
        ("mem0", 0, 8),
    ]
    assert len(memory.ranges(BUF, 24)) == 1
    with pytest.raises(AddressSpaceError):
        memory.ranges(RAM_END - 1, 2)
    assert memory.is_ram(RAM_END - 1) and not memory.is_ram(RAM_END)


def test_popped_buffers_stay_valid_when_the_memory_is_unmapped(
    machine: Machine, memory: GuestMemory
) -> None:
    """Like QEMU's mapped iovecs: the response still lands, the next pop refuses the ring."""
    used = DIMM + 0x1000
    q = DriverQueue(memory, DESC, 0x4000, num=NUM)
    vq = VirtQueue(memory, NUM, q.desc_gpa, q.avail_gpa, used)
    resp = DIMM + 0x2000
    q.add([(BUF, 4)], [(resp, 4)])
    chain = vq.pop()
    assert chain is not None
    machine.remove_device("dimm0")  # unmapped; its backend stays mapped in the host
    assert not memory.is_ram(resp)
    chain.write_in(b"done")
    vq.push(chain.head, 4)
    assert vq.used_idx == 1
    assert machine.backends["d0"].memory.read(0x2000, 4) == b"done"
    with pytest.raises(RingAccessError, match="used ring"):
        vq.pop()


def test_buffers_taken_out_of_reach_are_refused_not_touched(
    machine: Machine, memory: GuestMemory
) -> None:
    """A request that makes its own buffers PROT_NONE: nothing is copied into them (that would
    be a SIGSEGV), the response and the used entry are refused instead."""
    dev = vmem(machine)
    plug(dev, 9)
    plug(dev, 10)
    used = dev.addr + 9 * dev.block_size
    q = DriverQueue(memory, DESC, 0x4000, num=NUM)
    vq = VirtQueue(memory, NUM, q.desc_gpa, q.avail_gpa, used)
    resp = used + 0x2000
    q.add([(BUF, 4)], [(resp, 4)])
    chain = vq.pop()
    assert chain is not None
    assert dev.execute(Request(ReqType.UNPLUG, used, 1)).type == 0
    assert memory.address_space.find(resp) is not None  # block 10 keeps the memslot mapped
    with pytest.raises(BufferAddressError, match="out of reach"):
        chain.write_in(b"done")
    with pytest.raises(RingAccessError, match=r"used ring.*out of reach"):
        vq.push(chain.head, 4)
    assert vq.used_idx == 0
    plug(dev, 9)  # back in reach (and discarded meanwhile): nothing was written there
    assert memory.read(resp, 4) == bytes(4)


def test_closed_memory_is_refused_not_touched(machine: Machine, memory: GuestMemory) -> None:
    raw = Raw(memory)
    raw.desc(0, BUF, 4)
    raw.publish(0)
    vq = raw.queue()
    chain = vq.pop()
    assert chain is not None
    vq.push(chain.head, 0)
    raw.publish(0)
    machine.close()
    with pytest.raises(RingAccessError, match=r"closed|no host memory"):
        vq.pop()


def test_available_index_wraps(memory: GuestMemory) -> None:
    raw = Raw(memory)
    raw.desc(1, BUF, 4)
    raw.idx = 0xFFFF
    raw.publish(1)
    assert raw.idx == 0
    vq = raw.queue()
    vq.last_avail_idx = 0xFFFF
    vq.used_idx = 0xFFFF
    chain = vq.pop()
    assert chain is not None and chain.head == 1 and vq.last_avail_idx == 0
    vq.push(1, 0)
    assert memory.read(USED + 2, 2) == b"\x00\x00"
    assert memory.read(USED + 4 + 8 * (NUM - 1), 8) == struct.pack("<II", 1, 0)


def test_push_needs_a_popped_chain(memory: GuestMemory) -> None:
    raw = Raw(memory)
    vq = raw.queue()
    with pytest.raises(VirtQueueError, match="push without"):
        vq.push(0, 0)
    raw.desc(0, BUF, 4)
    raw.publish(0)
    assert vq.pop() is not None
    with pytest.raises(ValueError, match="head 16"):
        vq.push(NUM, 0)
    with pytest.raises(ValueError, match="bytes written"):
        vq.push(0, 1 << 32)
    assert vq.inflight == 1


def test_driver_queue_limits(memory: GuestMemory) -> None:
    with pytest.raises(DriverQueueError, match="cannot hold"):
        DriverQueue(memory, DESC, 0x100, num=NUM)
    with pytest.raises(QueueSetupError):
        DriverQueue(memory, DESC, 0x4000, num=12)
    q = DriverQueue(memory, DESC, desc_table_size(4) + 0x40, num=4)
    assert q.indirect_capacity == 0
    with pytest.raises(DriverQueueError, match="indirect table of 0"):
        q.add([(BUF, 1)], [], indirect=True)
    with pytest.raises(DriverQueueError, match="at least one"):
        q.add([], [])
    q.add([(BUF, 1)] * 3, [])
    with pytest.raises(DriverQueueError, match="2 buffers but 1 free"):
        q.add([(BUF, 1)], [(BUF, 1)])


def test_driver_refuses_bad_used_entries(memory: GuestMemory) -> None:
    q = DriverQueue(memory, DESC, 0x4000, num=NUM)
    memory.write(q.used_gpa, struct.pack("<HHII", 0, 1, 5, 0))
    with pytest.raises(DriverQueueError, match="head 5, which is not in flight"):
        q.get_used()
    memory.write(q.used_gpa, struct.pack("<HH", 0, NUM + 1))
    with pytest.raises(DriverQueueError, match="used index"):
        q.get_used()
