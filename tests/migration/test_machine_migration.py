"""Migrating a machine through the stream: two machines in one process on the KVM model.

The destination decides its own memslots and maps exactly those that hold plugged blocks;
QEMU's sanity checks give QEMU's messages; a destination that cannot take the state is left
with nothing mapped.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from machines import check_invariants

from memslots.devices.virtio_mem.device import VirtioMem, VirtioMemEarlyState, VirtioMemLateState
from memslots.devices.virtio_mem.wire import ReqType, Request, Resp, Response
from memslots.errors import EXIT_BAD_INPUT, KvmError, MigrationError
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory, Section
from memslots.migration.channel import Buffer, BytesSource, MemorySink, SocketSink, SocketSource
from memslots.migration.machine import (
    LoadedMachine,
    describe_machine,
    load_machine,
    ram_ranges,
    save_machine,
)
from memslots.migration.sections import (
    decode_early,
    decode_late,
    encode_early,
    encode_late,
    pack_bits,
    unpack_bits,
)
from memslots.migration.stream import StreamReader, StreamWriter
from memslots.options import MachineConfig, parse_machine_config
from memslots.sizes import GiB, MiB
from memslots.vhost.backend import VhostModel

BS = 2 * MiB
DEVICE = "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"


def config(
    memory: str = "1G,maxmem=1025G",
    size: str = "1T",
    extra: str = "",
    backend_id: str = "mem0",
    device: bool = True,
) -> MachineConfig:
    devices = [f"virtio-mem,id=vmem0,memdev={backend_id},dynamic-memslots=on{extra}"]
    return parse_machine_config(
        memory,
        [f"memory-backend-ram,id={backend_id},size={size},reserve=off"],
        devices if device else [],
        accel="sim",
    )


def machine(
    *, vhost: int | None = None, vm: KvmModel | None = None, incoming: bool = False, **kw: Any
) -> Machine:
    return Machine(
        config(**kw),
        vm=vm if vm is not None else KvmModel(),
        vhost=[VhostModel("vhost0", vhost)] if vhost else None,
        incoming=incoming,
    )


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


def plug(dev: VirtioMem, gpa: int, blocks: int) -> None:
    """The guest plugs ``blocks`` blocks at ``gpa`` (the whole device may be requested, so that
    the usable region reaches any block)."""
    if dev.requested_size < dev.region_size:
        dev.set_requested_size(dev.region_size)
    resp = Response.unpack(dev.handle_request(Request(ReqType.PLUG, gpa, blocks).pack()))
    assert resp.type == Resp.ACK


def migrate(src: Machine, dst: Machine, **kw: Any) -> LoadedMachine:
    sink = MemorySink()
    save_machine(src, StreamWriter(sink), **kw)
    return load_machine(dst, StreamReader(BytesSource(bytes(sink.data), chunk=300_000)))


class CountBatches:
    """A memory listener that counts the transactions that changed something."""

    def __init__(self) -> None:
        self.batches = 0

    def begin(self) -> None:
        self.batches += 1

    def region_add(self, section: Section) -> None:
        pass

    def region_del(self, section: Section) -> None:
        pass

    def commit(self) -> None:
        pass


def spread(src: Machine) -> tuple[VirtioMem, dict[int, bytes]]:
    """Plug blocks in memslots 0, 3 (two ranges) and 200 of the source; write data in them."""
    dev = src.virtio_mem("vmem0")
    memory = GuestMemory(src.address_space)
    data = {}
    for gpa, blocks in (
        (dev.addr, 2),
        (dev.addr + 3 * 4 * GiB + 10 * BS, 1),
        (dev.addr + 3 * 4 * GiB + 20 * BS, 3),
        (dev.addr + 200 * 4 * GiB, 1),
    ):
        plug(dev, gpa, blocks)
        for i in range(blocks):
            data[gpa + i * BS + 4096 * i] = f"block at {gpa:#x}+{i}".encode()
    for gpa, payload in data.items():
        memory.write(gpa, payload)
    memory.write(64 * MiB, b"boot RAM")
    data[64 * MiB] = b"boot RAM"
    return dev, data


def test_256_memslots_to_a_destination_that_decides_one(machines: list[Machine]) -> None:
    src = machine()
    machines.append(src)
    dev, data = spread(src)
    assert dev.nb_memslots == 256 and dev.mapped_memslots == 3
    dst = machine(vhost=32, incoming=True)  # a 32-slot back-end plugged first: 1 memslot
    machines.append(dst)
    ddev = dst.virtio_mem("vmem0")
    assert ddev.nb_memslots == 1 and ddev.mapped_memslots == 0
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            save_machine(src, StreamWriter(SocketSink(a)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            a.close()

    thread = threading.Thread(target=send)
    thread.start()
    try:
        loaded = load_machine(dst, StreamReader(SocketSource(b)))
    finally:
        thread.join()
        b.close()
    assert not errors
    assert ddev.bitmap == dev.bitmap and ddev.size == dev.size == 7 * BS
    assert ddev.mapped_memslots == 1
    check_invariants(dst, ddev)
    memory = GuestMemory(dst.address_space)
    for gpa, payload in data.items():
        assert memory.read(gpa, len(payload)) == payload
    # Only plugged memory and boot RAM travel; the data pages are the ones written.
    assert loaded.stats.normal_pages == len(data)
    assert loaded.stats.zero_pages == (GiB + 7 * BS) // 4096 - len(data)


def test_a_destination_with_more_memslots_maps_only_those_with_plugged_blocks(
    machines: list[Machine],
) -> None:
    src = machine(vhost=32)
    machines.append(src)
    dev, data = spread(src)
    assert dev.nb_memslots == 1 and dev.mapped_memslots == 1
    dst = machine(incoming=True)
    machines.append(dst)
    ddev = dst.virtio_mem("vmem0")
    counter = CountBatches()
    dst.address_space.register(counter)
    counter.batches = 0  # registering replayed the current view as one batch
    migrate(src, dst)
    assert [m.index for m in ddev.memslot_map() if m.mapped] == [0, 3, 200]
    # One transaction per plugged range that needs a new memslot (the two ranges in memslot 3
    # share it, so the second maps nothing).
    assert counter.batches == 3
    check_invariants(dst, ddev)
    memory = GuestMemory(dst.address_space)
    assert all(memory.read(gpa, len(p)) == p for gpa, p in data.items())


def test_late_state_travels_and_unplugged_memory_is_discarded(machines: list[Machine]) -> None:
    src = machine()
    machines.append(src)
    dev = src.virtio_mem("vmem0")
    plug(dev, dev.addr + BS, 1)
    dev.set_requested_size(40 * BS)  # the guest has not caught up yet
    dst = machine(incoming=True)
    machines.append(dst)
    ddev = dst.virtio_mem("vmem0")
    assert ddev.memdev is not None
    ddev.memdev.memory.write(0, b"stale")  # in an unplugged block
    sizes: list[int] = []
    ddev.size_change_listeners.append(lambda d, size: sizes.append(size))
    loaded = migrate(src, dst, virtio={"virtio-mem/vmem0": b"queue state"})
    assert (ddev.requested_size, ddev.usable_region_size) == (40 * BS, dev.usable_region_size)
    assert ddev.size == BS and sizes == []  # QEMU emits no size change for the loaded size
    assert ddev.memdev.memory.read(0, 5) == bytes(5)
    assert loaded.virtio == {"virtio-mem/vmem0": b"queue state"}


def test_guest_and_vcpu_state_sections_round_trip(machines: list[Machine]) -> None:
    src, dst = machine(), machine(incoming=True)
    machines += [src, dst]
    states = {"guest/vmem0": (2, b"driver state"), "vcpu/0": (1, bytes(range(256)))}
    assert migrate(src, dst, states=states).states == states


def test_incoming_realize_skips_the_initial_discard(machines: list[Machine]) -> None:
    def prefill(m: Machine) -> None:
        m.backends["mem0"].memory.write(4096, b"kept")

    for incoming, expect in ((False, bytes(4)), (True, b"kept")):
        m = Machine(config(), vm=KvmModel(), incoming=incoming, before_devices=prefill)
        machines.append(m)
        assert m.backends["mem0"].memory.read(4096, 4) == expect


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"extra": ",memaddr=0x140000000", "memory": "1G,maxmem=1026G"},
            "virtio-mem 'vmem0': Property 'memaddr' changed from 0x100000000 to 0x140000000",
        ),
        (
            {"size": "1023G"},
            "virtio-mem 'vmem0': Property 'memdev' size changed from 0x10000000000 to 0xffc0000000",
        ),
        (
            {"extra": ",block-size=4M"},
            "virtio-mem 'vmem0': Property 'block-size' changed from 0x200000 to 0x400000",
        ),
    ],
)
def test_sanity_mismatches_give_qemus_messages(
    machines: list[Machine], kw: dict[str, Any], message: str
) -> None:
    src = machine(memory=kw.get("memory", "1G,maxmem=1025G"))
    machines.append(src)
    spread(src)
    dst = machine(incoming=True, **kw)
    machines.append(dst)
    with pytest.raises(MigrationError) as info:
        migrate(src, dst)
    assert str(info.value) == message
    ddev = dst.virtio_mem("vmem0")
    assert ddev.size == 0 and ddev.mapped_memslots == 0
    assert len(dst.kvm.slots()) == 1  # boot RAM only


def test_node_mismatch_message(machines: list[Machine]) -> None:
    dst = machine(incoming=True)
    machines.append(dst)
    ddev = dst.virtio_mem("vmem0")
    state = ddev.save_early()
    crafted = VirtioMemEarlyState(
        state.addr, state.region_size, state.block_size, 1, state.size, state.bitmap
    )
    with pytest.raises(
        MigrationError, match=r"^virtio-mem 'vmem0': Property 'node' changed from 1 to 0$"
    ):
        ddev.load_early(crafted)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bitmap": b"\x01"}, "the bitmap has 1 entries"),
        ({"bitmap_value": 2}, "of 0 or 1"),
        ({"size": 3 * BS}, "size 0x600000 but 1 block"),
    ],
)
def test_corrupt_early_state_is_refused(
    machines: list[Machine], change: dict[str, Any], message: str
) -> None:
    dst = machine(incoming=True)
    machines.append(dst)
    ddev = dst.virtio_mem("vmem0")
    bitmap = bytearray(ddev.nb_blocks)
    bitmap[5] = 1
    size = BS
    if "bitmap" in change:
        bitmap = bytearray(change["bitmap"])
    if "bitmap_value" in change:
        bitmap[5] = change["bitmap_value"]
    if "size" in change:
        size = change["size"]
    state = VirtioMemEarlyState(ddev.addr, ddev.region_size, BS, 0, size, bytes(bitmap))
    with pytest.raises(MigrationError, match=message):
        ddev.load_early(state)
    assert ddev.mapped_memslots == 0 and ddev.size == 0


def test_load_needs_a_fresh_device_and_checks_the_late_state(machines: list[Machine]) -> None:
    m = machine()
    machines.append(m)
    dev = m.virtio_mem("vmem0")
    plug(dev, dev.addr, 1)
    with pytest.raises(MigrationError, match="needs a fresh device"):
        dev.load_early(dev.save_early())
    with pytest.raises(MigrationError, match="requested-size 0x1000"):
        dev.load_late(VirtioMemLateState(dev.usable_region_size, 4096))
    with pytest.raises(MigrationError, match="usable region size"):
        dev.load_late(VirtioMemLateState(2 * dev.region_size, 0))


class FailingCreate(KvmModel):
    """A KVM model whose ``fail_at``-th memslot creation fails with ENOMEM."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.calls = 0

    def set_memory_region(
        self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        if slot not in self.slots():
            self.calls += 1
            if self.calls == self.fail_at:
                raise KvmError("injected: no memory for the memslot", errno.ENOMEM)
        super().set_memory_region(slot, gpa, size, userspace_addr, flags)


@pytest.mark.parametrize("fail_at", [2, 3, 4])
def test_a_mapping_the_destination_cannot_make_fails_cleanly(
    machines: list[Machine], fail_at: int
) -> None:
    src = machine()
    machines.append(src)
    spread(src)
    vm = FailingCreate(fail_at)  # creation 1 is boot RAM; then memslots 0, 3, 200
    dst = machine(vm=vm, incoming=True)
    machines.append(dst)
    ddev = dst.virtio_mem("vmem0")
    with pytest.raises(MigrationError, match=r"cannot take the migrated plugged memory.*injected"):
        migrate(src, dst)
    assert ddev.mapped_memslots == 0 and ddev.size == 0 and not ddev.bitmap.count(1)
    assert [s.gpa for s in vm.slots().values()] == [0]  # boot RAM only
    check_invariants(dst, ddev)


def test_a_full_vhost_back_end_fails_cleanly(machines: list[Machine]) -> None:
    src = machine()
    machines.append(src)
    spread(src)
    dst = machine(vhost=32, incoming=True)
    machines.append(dst)
    backend = dst.budget.vhost_backends[0]
    assert isinstance(backend, VhostModel)
    backend.other_used = backend.max_memslots - backend.used_memslots
    with pytest.raises(MigrationError, match="no free memory region"):
        migrate(src, dst)
    assert dst.virtio_mem("vmem0").mapped_memslots == 0


def test_ram_block_and_device_mismatches(machines: list[Machine]) -> None:
    src = machine()
    machines.append(src)
    spread(src)
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"backend_id": "other"},
            'Unknown ramblock "mem0", cannot accept migration',
        ),
        (
            {"memory": "2G,maxmem=1026G"},
            "Length mismatch: pc.ram: 0x40000000 in != 0x80000000",
        ),
        (
            {"memory": "1G,maxmem=1027G"},
            "the device memory area changed from [0x100000000, +0x10000000000) to "
            "[0x100000000, +0x10080000000)",
        ),
        (
            {"device": False},
            "Unknown savevm section or instance 'virtio-mem/vmem0' 0. Make sure that your "
            "current VM setup matches your saved VM setup, including any hotplugged devices",
        ),
    ]
    for kw, message in cases:
        dst = machine(incoming=True, **kw)
        machines.append(dst)
        with pytest.raises(MigrationError) as info:
            migrate(src, dst)
        assert message in str(info.value), kw
        for dev in dst.memory_devices:
            assert isinstance(dev, VirtioMem) and dev.mapped_memslots == 0


def test_a_destination_device_without_source_state(machines: list[Machine]) -> None:
    src = machine(device=False)
    dst = machine(incoming=True)
    machines += [src, dst]
    with pytest.raises(MigrationError, match="no state for virtio-mem/vmem0"):
        migrate(src, dst)


def test_a_cut_or_corrupt_stream_leaves_nothing_mapped(machines: list[Machine]) -> None:
    src = machine()
    machines.append(src)
    spread(src)
    sink = MemorySink()
    save_machine(src, StreamWriter(sink))
    data = bytes(sink.data)
    flipped = bytearray(data)
    flipped[-200] ^= 0x10  # in the late sections
    for bad, message in ((data[: len(data) // 2], "ended early"), (bytes(flipped), "checksum")):
        dst = machine(incoming=True)
        machines.append(dst)
        with pytest.raises(MigrationError, match=message) as info:
            load_machine(dst, StreamReader(BytesSource(bad)))
        assert info.value.exit_code == EXIT_BAD_INPUT  # a stream QEMU would refuse too
        ddev = dst.virtio_mem("vmem0")
        assert ddev.size == 0 and ddev.mapped_memslots == 0
        assert len(dst.kvm.slots()) == 1


def test_dimm_backends_travel_whole(machines: list[Machine]) -> None:
    def cfg() -> MachineConfig:
        return parse_machine_config(
            "1G,slots=2,maxmem=3G",
            ["memory-backend-memfd,id=d0,size=1G"],
            ["pc-dimm,id=dimm0,memdev=d0"],
            accel="sim",
        )

    src = Machine(cfg(), vm=KvmModel())
    dst = Machine(cfg(), vm=KvmModel(), incoming=True)
    machines += [src, dst]
    addr = src.memory_devices[0].get_addr()
    GuestMemory(src.address_space).write(addr + 123 * 4096, b"dimm data")
    assert [(r[0], r[2], r[3]) for r in ram_ranges(src)] == [(0, 0, GiB), (1, 0, GiB)]
    migrate(src, dst)
    assert GuestMemory(dst.address_space).read(addr + 123 * 4096, 9) == b"dimm data"
    assert describe_machine(dst)["ram_blocks"][1]["fd_backed"] is True


def test_save_keeps_the_devices_busy_only_while_saving(machines: list[Machine]) -> None:
    src = machine()
    machines.append(src)
    dev = src.virtio_mem("vmem0")
    seen: list[bool] = []

    class Spy(MemorySink):
        def send(self, parts: Sequence[Buffer]) -> None:
            seen.append(dev.busy)
            super().send(parts)

    save_machine(src, StreamWriter(Spy()))
    assert seen and all(seen) and not dev.busy


# -- section payloads --------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1), max_size=200))
def test_bits_pack_and_unpack(bits: list[int]) -> None:
    raw = bytes(bits)
    packed = pack_bits(raw)
    assert len(packed) == (len(raw) + 7) // 8
    assert unpack_bits(packed, len(raw)) == raw


def test_section_codecs_check_their_input() -> None:
    early = VirtioMemEarlyState(1 << 32, 1 << 30, BS, 0, BS, bytes([0, 1] + [0] * 510))
    assert decode_early(encode_early(early), "x") == early
    late = VirtioMemLateState(BS, BS, b"virtio")
    assert decode_late(encode_late(late), "x") == late
    with pytest.raises(MigrationError, match="too short"):
        decode_early(b"short", "x")
    with pytest.raises(MigrationError, match="needs 64 bytes"):
        decode_early(encode_early(early)[:-1], "x")
    with pytest.raises(MigrationError, match="beyond its end"):
        unpack_bits(b"\x80", 7)
    with pytest.raises(MigrationError, match="says 6 bytes"):
        decode_late(encode_late(late) + b"!", "x")
    with pytest.raises(MigrationError, match="too short"):
        decode_late(b"", "x")
