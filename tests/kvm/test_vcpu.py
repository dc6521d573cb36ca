"""The probe vCPU: a real guest on /dev/kvm checks memslots from inside, at CPL3 (and CPL0)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest
from conftest import requires_kvm

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import GuestMemoryFault, VcpuError
from memslots.guest.inorder import drive_to
from memslots.host.memory import HostMemory
from memslots.kvm.vcpu import IMAGE_SIZE, ProbeVcpu, pattern_words
from memslots.kvm.vm import KvmVm
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory
from memslots.options import parse_machine_config
from memslots.sizes import GiB, MiB, TiB

pytestmark = requires_kvm

OBJECTS = [
    "memory-backend-ram,id=big,size=1T,reserve=off",
    "memory-backend-memfd,id=mfd,size=2G",
]
DEVICES = [
    "virtio-mem,id=vbig,memdev=big,dynamic-memslots=on",
    "virtio-mem,id=vmfd,memdev=mfd,dynamic-memslots=on,memslot-size=1G",
]


@pytest.fixture
def machine() -> Iterator[tuple[Machine, KvmVm]]:
    """A real machine with a 1 TiB anonymous and a 2 GiB memfd virtio-mem device."""
    vm = KvmVm()
    config = parse_machine_config("1G,maxmem=1028G", OBJECTS, DEVICES, accel="kvm")
    with Machine(config, vm=vm) as m:
        yield m, vm


@pytest.fixture
def probe(machine: tuple[Machine, KvmVm]) -> Iterator[ProbeVcpu]:
    m, vm = machine
    with ProbeVcpu(vm, GuestMemory(m.address_space)) as vcpu:
        yield vcpu


def host_has_pattern(mem: HostMemory, dev: VirtioMem, gpa: int, length: int, seed: int) -> bool:
    """Whether the host sees the pattern's words in the device's backend."""
    return all(
        mem.read(addr - dev.addr, 8) == value.to_bytes(8, "little")
        for addr, value in pattern_words(gpa, length, seed)
    )


@pytest.mark.parametrize("cpl3", [True, False], ids=["cpl3", "cpl0"])
def test_boot_ram_far_addresses_and_errors(cpl3: bool) -> None:
    config = parse_machine_config("1G", [], [], accel="kvm")
    vm = KvmVm()
    with Machine(config, vm=vm) as m, ProbeVcpu(vm, GuestMemory(m.address_space), cpl3=cpl3) as v:
        ram = GuestMemory(m.address_space)
        ram.write(64 * MiB, (0x1122334455667788).to_bytes(8, "little"))
        assert v.read64(64 * MiB) == 0x1122334455667788
        assert v.read8(64 * MiB + 1) == 0x77
        assert v.write64(64 * MiB + 8, 0xDEADBEEF_CAFEF00D) and v.write8(64 * MiB + 16, 0x5A)
        assert ram.read(64 * MiB + 8, 9) == (0xDEADBEEF_CAFEF00D).to_bytes(8, "little") + b"\x5a"
        assert v.read8(0x1000) is not None  # the image itself is RAM and readable
        # Boot RAM ends at 1 GiB; beyond it, and far above, nothing backs the GPA.
        assert v.is_ram(GiB - 1) and not v.is_ram(GiB)
        before = v.stats
        assert v.read64(100 * TiB) is None
        assert v.read8((1 << v.phys_bits) - 1) is None
        assert not v.write64(5 * TiB, 1)
        after = v.stats
        assert (after.commands - before.commands, after.mmio_exits - before.mmio_exits) == (3, 3)
        with pytest.raises(ValueError, match="physical space"):
            v.read8(1 << v.phys_bits)
        with pytest.raises(ValueError, match="aligned"):
            v.read64(64 * MiB + 4)
        with pytest.raises(ValueError, match="image"):
            v.write8(IMAGE_SIZE - 1, 0)
        with pytest.raises(VcpuError) as second:
            ProbeVcpu(vm, ram)
        assert second.value.errno == errno.EEXIST
        # White-box: lift the host-side bound so that the guest itself meets a GPA above its
        # MAXPHYADDR, which is a reserved-bit #PF (P|RSVD), not an MMIO exit.
        v._phys_bits = 52
        with pytest.raises(VcpuError, match="#PF") as fault:
            v.read64(1 << 50)
        assert fault.value.vector == 14 and fault.value.error_code is not None
        assert fault.value.error_code & 0x9 == 0x9
        assert v.read64(64 * MiB) == 0x1122334455667788  # the vCPU was reset and still works
        v.close()
        v.close()
        with pytest.raises(VcpuError, match="closed"):
            v.read8(64 * MiB)


def test_anonymous_device_memslots_seen_from_the_guest(
    machine: tuple[Machine, KvmVm], probe: ProbeVcpu
) -> None:
    m, _vm = machine
    dev = m.virtio_mem("vbig")
    mem = m.backends["big"].memory
    assert isinstance(mem, HostMemory)
    bs = dev.block_size
    slot_size = dev.memslot_map()[0].size
    drive_to(dev, slot_size + 2 * bs)  # memslot 0 full, two blocks of memslot 1
    s0, s1, s2 = dev.memslot_map()[:3]
    assert (s0.mapped, s1.mapped, s2.mapped) == (True, True, False)

    # Memslot boundaries, byte-exact (unplugged blocks of a mapped memslot are out of reach:
    # test_unplugged_block_of_a_mapped_memslot_faults).
    assert dev.addr == s0.gpa == m.layout.device_memory_base  # above 1 TiB on AMD hosts
    assert not probe.is_ram(s0.gpa - 1) and probe.is_ram(s0.gpa)
    assert probe.is_ram(s0.gpa + s0.size - 1) and probe.is_ram(s1.gpa + 2 * bs - 1)
    assert not probe.is_ram(s2.gpa)
    assert not probe.is_ram(s2.gpa + 5 * bs + 8)  # an unplugged block of an unmapped memslot

    # A few plugged blocks: the first write of each populates a 2 MiB THP, so keep it short.
    guest_blocks = [s0.gpa, s0.gpa + s0.size - bs, s1.gpa, s1.gpa + bs]
    for gpa in guest_blocks:
        assert probe.write_pattern(gpa, bs, seed=gpa)
        assert host_has_pattern(mem, dev, gpa, bs, seed=gpa)
    host_block = s0.gpa + bs
    for addr, value in pattern_words(host_block, bs, seed=99):
        mem.write(addr - dev.addr, value.to_bytes(8, "little"))
    assert probe.check_pattern(host_block, bs, seed=99)
    assert not probe.check_pattern(host_block, bs, seed=98)

    drive_to(dev, slot_size)  # unplug memslot 1's blocks: it is unmapped
    assert not dev.memslot_map()[1].mapped
    assert probe.read64(s1.gpa) is None and not probe.write8(s1.gpa + bs, 1)
    assert not probe.check_pattern(s1.gpa, bs, seed=s1.gpa)
    drive_to(dev, slot_size + 2 * bs)  # plug again: unplug discarded the memory
    assert dev.memslot_map()[1].mapped
    assert probe.read64(s1.gpa) == 0 and probe.read64(s1.gpa + 2 * bs - 8) == 0
    assert not probe.check_pattern(s1.gpa, bs, seed=s1.gpa)
    # Memslot 0 kept its data through memslot 1's removal and re-creation.
    assert probe.check_pattern(s0.gpa, bs, seed=s0.gpa)
    assert probe.check_pattern(s0.gpa + s0.size - bs, bs, seed=s0.gpa + s0.size - bs)
    assert probe.check_pattern(host_block, bs, seed=99)


def test_memfd_device_every_block_in_one_run(
    machine: tuple[Machine, KvmVm], probe: ProbeVcpu
) -> None:
    m, _vm = machine
    dev = m.virtio_mem("vmfd")
    mem = m.backends["mfd"].memory
    assert isinstance(mem, HostMemory) and mem.fd is not None
    bs = dev.block_size
    s0, s1 = dev.memslot_map()[:2]
    drive_to(dev, s0.size)
    assert (s0.size // bs, dev.nb_plugged_blocks) == (512, 512)
    runs = probe.stats.runs
    assert probe.write_pattern(s0.gpa, s0.size, seed=7)
    assert probe.check_pattern(s0.gpa, s0.size, seed=7)
    assert probe.stats.runs - runs == 2  # 512 blocks, one KVM_RUN each way
    # The host sees the guest's words through the memfd, as a vhost-user back-end would.
    for addr, value in pattern_words(s0.gpa, s0.size, seed=7)[::97]:
        assert os.pread(mem.fd, 8, addr - dev.addr) == value.to_bytes(8, "little")
    mem.write(3 * bs + 64, b"from host")
    assert probe.read64(s0.gpa + 3 * bs + 64) == int.from_bytes(b"from hos", "little")
    assert probe.is_ram(s0.gpa + s0.size - 1) and probe.read8(s1.gpa) is None

    drive_to(dev, 0)  # all unplugged: the memslot is unmapped
    assert probe.read8(s0.gpa) is None and not probe.write64(s0.gpa, 1)
    drive_to(dev, bs)
    assert probe.read64(s0.gpa) == 0  # discarded, not the old pattern
    assert not probe.check_pattern(s0.gpa, bs, seed=7)


UNPLUGGED_MACHINE = ("1G,maxmem=3G", ["memory-backend-memfd,id=m,size=2G"])


@pytest.mark.parametrize(
    ("cpl3", "detected_by"), [(True, "efault"), (False, "mmio-exit")], ids=["cpl3", "cpl0"]
)
def test_unplugged_block_of_a_mapped_memslot_faults(cpl3: bool, detected_by: str) -> None:
    """``unplugged-inaccessible=on``: the guest's read and write of an unplugged block whose
    memslot is mapped (a neighbour is plugged) fail without allocating host memory (memfd: a
    read would allocate); the vCPU stops until reset; the neighbour keeps its data. CPL3 runs
    the access natively (KVM_RUN fails with EFAULT here), CPL0 through KVM's emulator (an
    MMIO exit inside a memslot)."""
    memory, objects = UNPLUGGED_MACHINE
    devices = ["virtio-mem,id=v,memdev=m,memslot-size=1G,requested-size=8M"]
    vm = KvmVm()
    config = parse_machine_config(memory, objects, devices, accel="kvm")
    with Machine(config, vm=vm) as m, ProbeVcpu(vm, GuestMemory(m.address_space), cpl3=cpl3) as p:
        dev = m.virtio_mem("v")
        mem = m.backends["m"].memory
        assert isinstance(mem, HostMemory)
        bs = dev.block_size
        drive_to(dev, bs)
        assert dev.memslot_map()[0].mapped
        assert p.write64(dev.addr + 8, 0x1234)
        allocated = mem.allocated_bytes()
        for access, gpa in (("read", dev.addr + 2 * bs + 8), ("write", dev.addr + 3 * bs + 3)):
            with pytest.raises(GuestMemoryFault) as info:
                if access == "read":
                    p.read64(gpa)
                else:
                    p.write8(gpa, 7)
            fault = info.value
            assert (fault.gpa, fault.access, fault.detected_by) == (gpa, access, detected_by)
            assert p.fault is fault
            with pytest.raises(VcpuError, match="reset it first"):
                p.read64(dev.addr + 8)
            p.reset()
            assert p.fault is None and p.read64(dev.addr + 8) == 0x1234
        assert mem.allocated_bytes() == allocated


def test_without_protection_the_guest_reaches_unplugged_memory() -> None:
    """``unplugged-inaccessible=off`` (QEMU's old behaviour, one memslot): the guest reads and
    writes unplugged blocks, and each touch makes the host allocate (memfd)."""
    memory, objects = UNPLUGGED_MACHINE
    devices = ["virtio-mem,id=v,memdev=m,unplugged-inaccessible=off,requested-size=8M"]
    vm = KvmVm()
    config = parse_machine_config(memory, objects, devices, accel="kvm")
    with Machine(config, vm=vm) as m, ProbeVcpu(vm, GuestMemory(m.address_space)) as p:
        dev = m.virtio_mem("v")
        mem = m.backends["m"].memory
        assert isinstance(mem, HostMemory)
        drive_to(dev, dev.block_size)
        allocated = mem.allocated_bytes()
        assert p.read64(dev.addr + 2 * dev.block_size) == 0
        assert p.write8(dev.addr + 3 * dev.block_size, 7)
        assert mem.allocated_bytes() > allocated
        assert mem.read(3 * dev.block_size, 1) == b"\x07"
