"""``unplugged-inaccessible=on``: the device keeps its unplugged blocks out of reach, in the
order of operations docs/DESIGN.md gives, and every failure leaves the state as it was."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from machines import check_invariants, machine_with

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.devices.virtio_mem.wire import ReqType, Request, Resp, Response
from memslots.errors import HostMemoryError, InaccessibleMemoryError, KvmError
from memslots.guest.inorder import drive_to
from memslots.host.memory import HostMemory
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory, Section
from memslots.sizes import GiB, MiB

BS = 2 * MiB


def req(dev: VirtioMem, kind: ReqType, block: int = 0, nb: int = 0) -> int:
    raw = dev.handle_request(Request(kind, dev.addr + block * BS, nb).pack())
    return Response.unpack(raw).type


def host(dev: VirtioMem) -> HostMemory:
    assert dev.memdev is not None and isinstance(dev.memdev.memory, HostMemory)
    return dev.memdev.memory


@pytest.fixture
def machine() -> Iterator[Machine]:
    """4 GiB of private anonymous memory as 1 GiB memslots, 1 GiB requested."""
    with machine_with("1G", extra=",memslot-size=1G") as m:
        yield m


class Recorder:
    """Records, as a memory listener, whether each mapped memslot's first block was in reach
    when KVM and the vhost back-ends were told."""

    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self.seen: list[tuple[str, int, bool]] = []

    def begin(self) -> None:
        pass

    def region_add(self, section: Section) -> None:
        if section.backend is self.memory:
            reach = not self.memory.inaccessible(section.offset, BS)
            self.seen.append(("add", section.offset, reach))

    def region_del(self, section: Section) -> None:
        if section.backend is self.memory:
            reach = not self.memory.inaccessible(section.offset, BS)
            self.seen.append(("del", section.offset, reach))

    def commit(self) -> None:
        pass


def test_realize_puts_the_whole_device_out_of_reach(machine: Machine) -> None:
    dev = machine.virtio_mem("vmem0")
    assert dev.protects and host(dev).protected_bytes == 4 * GiB
    memory = GuestMemory(machine.address_space)
    assert not memory.is_ram(dev.addr)
    check_invariants(machine, dev)


def test_plug_opens_before_mapping_and_unplug_closes_after_the_discard(machine: Machine) -> None:
    dev = machine.virtio_mem("vmem0")
    memory = host(dev)
    rec = Recorder(memory)
    machine.address_space.register(rec)
    discards: list[bool] = []
    real_discard = memory.discard

    def discard(offset: int, length: int) -> None:
        discards.append(memory.inaccessible(offset, length))
        real_discard(offset, length)

    memory.discard = discard  # type: ignore[method-assign]
    assert req(dev, ReqType.PLUG, 512, 2) == Resp.ACK  # memslot 1
    assert rec.seen == [("add", GiB, True)]
    guest = GuestMemory(machine.address_space)
    guest.write(dev.addr + 512 * BS, b"plugged")
    assert guest.read(dev.addr + 512 * BS, 7) == b"plugged"
    with pytest.raises(InaccessibleMemoryError):
        guest.write(dev.addr + 514 * BS, b"unplugged")  # the memslot is mapped, the block not
    assert req(dev, ReqType.UNPLUG, 513, 1) == Resp.ACK
    assert discards == [False] and memory.inaccessible(513 * BS, BS)
    assert req(dev, ReqType.UNPLUG, 512, 1) == Resp.ACK
    assert rec.seen[-1] == ("del", GiB, True)  # unmapped, then discarded, then closed
    assert discards == [False, False]
    check_invariants(machine, dev)


def test_unplug_all_and_system_reset_close_everything(machine: Machine) -> None:
    dev = machine.virtio_mem("vmem0")
    drive_to(dev, GiB)
    assert host(dev).protected_bytes == 3 * GiB
    assert req(dev, ReqType.UNPLUG_ALL) == Resp.ACK
    assert host(dev).protected_bytes == 4 * GiB
    check_invariants(machine, dev)
    drive_to(dev, GiB)
    machine.system_reset()
    assert dev.size == 0 and host(dev).protected_bytes == 4 * GiB
    check_invariants(machine, dev)


def test_a_refused_map_leaves_the_blocks_out_of_reach(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = machine.virtio_mem("vmem0")

    def refuse(*args: object, **kw: object) -> None:
        raise KvmError("no free memslot", 28)

    monkeypatch.setattr(machine.kvm.vm, "set_memory_region", refuse)
    assert req(dev, ReqType.PLUG, 0, 1) == Resp.BUSY
    assert dev.size == 0 and host(dev).protected_bytes == 4 * GiB
    check_invariants(machine, dev)


def test_protection_failures_are_busy_on_plug_and_counted_on_unplug(
    machine: Machine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dev = machine.virtio_mem("vmem0")
    memory = host(dev)

    def fail(offset: int, length: int) -> None:
        raise HostMemoryError("mprotect() failed: Cannot allocate memory")

    monkeypatch.setattr(memory, "unprotect", fail)
    assert req(dev, ReqType.PLUG, 0, 1) == Resp.BUSY
    assert dev.size == 0 and dev.protect_failures == 1 and not dev.memslot_map()[0].mapped
    monkeypatch.undo()
    assert req(dev, ReqType.PLUG, 0, 2) == Resp.ACK
    monkeypatch.setattr(memory, "protect", fail)
    with caplog.at_level(logging.WARNING, logger="memslots.devices.virtio_mem"):
        assert req(dev, ReqType.UNPLUG, 1, 1) == Resp.ACK  # unplugged and discarded anyway
    assert dev.size == BS and dev.protect_failures == 2
    assert "Cannot allocate memory" in caplog.text


def test_prealloc_populates_what_the_plug_opened() -> None:
    with machine_with("64M", extra=",memslot-size=1G,prealloc=on") as m:
        dev = m.virtio_mem("vmem0")
        memory = host(dev)
        assert req(dev, ReqType.PLUG, 0, 2) == Resp.ACK
        assert memory.resident_bytes(0, 2 * BS) == 2 * BS
        check_invariants(m, dev)


def test_a_failed_prealloc_is_busy_and_closes_again(monkeypatch: pytest.MonkeyPatch) -> None:
    with machine_with("64M", extra=",memslot-size=1G,prealloc=on") as m:
        dev = m.virtio_mem("vmem0")

        def fail(offset: int, length: int) -> None:
            raise HostMemoryError("the host could not supply the memory")

        monkeypatch.setattr(host(dev), "populate", fail)
        assert req(dev, ReqType.PLUG, 0, 1) == Resp.BUSY
        assert dev.size == 0 and host(dev).protected_bytes == 4 * GiB
        check_invariants(m, dev)


@pytest.mark.parametrize("setting", ["off", "auto"])
def test_off_keeps_every_block_in_reach(setting: str) -> None:
    """``off`` (and ``auto`` on private anonymous memory, which has the shared zeropage) keep
    QEMU's old behaviour: one memslot, unplugged blocks readable and writable."""
    with machine_with("64M", extra=f",unplugged-inaccessible={setting}") as m:
        dev = m.virtio_mem("vmem0")
        assert not dev.protects and dev.unplugged_inaccessible == "off"
        assert req(dev, ReqType.PLUG, 0, 1) == Resp.ACK
        guest = GuestMemory(m.address_space)
        guest.write(dev.addr + 5 * BS, b"unplugged")
        assert guest.read(dev.addr + 5 * BS, 9) == b"unplugged"
        assert host(dev).protected_bytes == 0
        check_invariants(m, dev)


def test_device_del_gives_the_backend_back_in_reach(machine: Machine) -> None:
    dev = machine.virtio_mem("vmem0")
    dev.set_requested_size(0)
    machine.remove_device("vmem0")
    assert host(dev).protected_bytes == 0 and not dev.protects


def test_out_of_reach_after(machine: Machine) -> None:
    dev = machine.virtio_mem("vmem0")
    drive_to(dev, 4 * BS)
    unplug = Request(ReqType.UNPLUG, dev.addr + 2 * BS, 2)
    assert dev.out_of_reach_after(unplug) == [(2 * BS, 4 * BS)]
    assert dev.out_of_reach_after(Request(ReqType.UNPLUG, dev.addr + 3 * BS, 2)) == []
    assert dev.out_of_reach_after(Request(ReqType.UNPLUG_ALL, 0, 0)) == [(0, 4 * BS)]
    assert dev.out_of_reach_after(Request(ReqType.PLUG, dev.addr + 4 * BS, 1)) == []
    dev.busy = True
    assert dev.out_of_reach_after(unplug) == []
