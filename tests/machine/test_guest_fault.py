"""A guest that touches memory out of its reach stops its VM until a system reset (on the KVM
model; the real vCPU's side is in tests/kvm/test_vcpu.py and tests/monitor/test_runtime.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from machines import check_invariants, machine_with

from memslots.errors import DeviceError, GuestMemoryFault
from memslots.machine.machine import Machine
from memslots.machine.vm import GuestFault, GuestVm
from memslots.sizes import MiB

BS = 2 * MiB


@pytest.fixture
def gvm() -> Iterator[GuestVm]:
    """A guest that plugged 64 MiB into memslot 0 (1 GiB) of a 4 GiB device."""
    with machine_with("64M", extra=",memslot-size=1G") as m, GuestVm(m) as vm:
        vm.settle()
        assert m.virtio_mem("vmem0").size == 64 * MiB
        yield vm


def test_a_read_of_an_unplugged_block_stops_the_vm(gvm: GuestVm) -> None:
    m: Machine = gvm.machine
    dev = m.virtio_mem("vmem0")
    seen: list[GuestFault] = []
    gvm.fault_listeners.append(seen.append)
    assert gvm.guest_access(dev.addr + 8, write=True, value=0x5A) == 0
    assert gvm.guest_access(dev.addr + 8, write=False) == 0x5A
    assert gvm.guest_access(1 << 45, write=False) is None  # nothing there: MMIO, no fault
    assert dev.memslot_map()[0].mapped
    target = dev.addr + 40 * BS + 3  # unplugged, inside the mapped memslot
    with pytest.raises(GuestMemoryFault) as info:
        gvm.guest_access(target, write=False)
    assert (info.value.gpa, info.value.access, info.value.detected_by) == (target, "read", "model")
    [fault] = seen
    assert gvm.fault is fault and not gvm.running
    assert (fault.device, fault.block, fault.block_address) == (dev, 40, dev.addr + 40 * BS)
    assert dev.guest_faults == 1
    assert all(g.stopped for g in gvm.guests.values())
    with pytest.raises(DeviceError, match="not running"):
        gvm.guest_access(dev.addr + 8, write=False)
    with pytest.raises(DeviceError, match="Resetting the Virtual Machine is required"):
        gvm.start()
    check_invariants(m, dev)

    gvm.system_reset()
    assert gvm.fault is None and not gvm.running and dev.size == 0
    gvm.start()
    gvm.settle()
    assert gvm.running and dev.size == 64 * MiB
    assert gvm.guest_access(dev.addr + 8, write=False) == 0  # the reset discarded it
    check_invariants(m, dev)


def test_a_write_through_the_guest_models_memory_use_stops_the_vm(gvm: GuestVm) -> None:
    dev = gvm.machine.virtio_mem("vmem0")
    guest = gvm.guests["vmem0"]
    assert guest.memory is not None
    with pytest.raises(GuestMemoryFault) as info:
        guest.memory.write_pattern(dev.addr + 100 * BS, BS, seed=1)
    assert info.value.access == "write" and gvm.fault is not None and not gvm.running
    assert gvm.fault.block == 100 and guest.stopped


def test_a_fault_outside_every_device_names_none(gvm: GuestVm) -> None:
    fault = gvm.guest_fault(
        GuestMemoryFault("far away", gpa=0x1000, size=8, access=None, detected_by="efault")
    )
    assert (fault.device, fault.block, fault.block_address) == (None, None, None)
    assert not gvm.running


def test_a_reset_of_a_running_vm_restarts_its_drivers(gvm: GuestVm) -> None:
    dev = gvm.machine.virtio_mem("vmem0")
    old = gvm.guests["vmem0"]
    gvm.system_reset()
    assert old.stopped and gvm.guests["vmem0"] is not old and gvm.running
    gvm.settle()
    assert dev.size == 64 * MiB
