"""The pc machine: layout of boot RAM and device memory, devices in order, the real kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import PlanFactory, requires_kvm

from memslots.errors import ConfigError, HostMemoryError, MemoryDeviceError, OptionError
from memslots.kvm.vm import KvmVm
from memslots.machine.layout import pc_layout
from memslots.machine.machine import Machine
from memslots.options import parse_machine_config, parse_machine_memory
from memslots.sizes import GiB, TiB


# Expected values follow QEMU 7.2's pc_memory_init by hand: RAM >= 3.5 GiB splits at 3 GiB, device
# memory starts at the next GiB after RAM above 4 GiB, and only an AMD vCPU moves RAM above 4 GiB
# to 1 TiB when device memory's end + the 2 GiB PCI hole - 1 reaches 1012 GiB (0xFD00000000).
@pytest.mark.parametrize(
    "vendor,memory,below,above,above_start,base,size",
    [
        # 4+1024 GiB: end 1029 GiB + 2 GiB hole >= 1012 GiB -> AMD relocates (QEMU 7.2 on an AMD
        # host put the device at 0x10040000000, on an Intel host at 0x140000000).
        ("amd", "4G,maxmem=1028G", 3 * GiB, GiB, TiB, 0x100_4000_0000, 1024 * GiB),
        ("intel", "4G,maxmem=1028G", 3 * GiB, GiB, 4 * GiB, 0x1_4000_0000, 1024 * GiB),
        ("amd", "4G,maxmem=8G", 3 * GiB, GiB, 4 * GiB, 5 * GiB, 4 * GiB),
        ("intel", "4G,maxmem=8G", 3 * GiB, GiB, 4 * GiB, 5 * GiB, 4 * GiB),
        ("amd", "2G,maxmem=4G", 2 * GiB, 0, 4 * GiB, 4 * GiB, 2 * GiB),
        ("amd", "4G,slots=4,maxmem=8G", 3 * GiB, GiB, 4 * GiB, 5 * GiB, 8 * GiB),
        # device memory ends at 1001 GiB: +2 GiB PCI hole stays below AMD's 1012 GiB window
        ("amd", "4G,maxmem=1000G", 3 * GiB, GiB, 4 * GiB, 5 * GiB, 996 * GiB),
        # ends at 1011 GiB: the hole would reach 1012 GiB, so RAM above 4G moves to 1 TiB (AMD)
        ("amd", "4G,maxmem=1010G", 3 * GiB, GiB, TiB, TiB + GiB, 1006 * GiB),
        ("intel", "4G,maxmem=1010G", 3 * GiB, GiB, 4 * GiB, 5 * GiB, 1006 * GiB),
        ("other", "4G,maxmem=1010G", 3 * GiB, GiB, 4 * GiB, 5 * GiB, 1006 * GiB),
        ("amd", "3584M", 3 * GiB, 512 * 1024 * 1024, 4 * GiB, 0, 0),
    ],
)
def test_pc_layout(
    vendor: str, memory: str, below: int, above: int, above_start: int, base: int, size: int
) -> None:
    lay = pc_layout(parse_machine_memory(memory), cpu_vendor=vendor, phys_bits=48)
    assert (lay.below_4g, lay.above_4g, lay.above_4g_start) == (below, above, above_start)
    assert (lay.device_memory_base, lay.device_memory_size) == (base, size)


def test_too_many_slots() -> None:
    with pytest.raises(OptionError, match="unsupported amount of memory slots: 257"):
        pc_layout(parse_machine_memory("4G,slots=257,maxmem=8G"), cpu_vendor="amd", phys_bits=48)


def test_boot_ram_sections(plan_machine: PlanFactory) -> None:
    m = plan_machine("4G,maxmem=8G")
    assert [(s.gpa, s.size, s.offset) for s in m.address_space.sections] == [
        (0, 3 * GiB, 0),
        (4 * GiB, GiB, 3 * GiB),
    ]
    assert m.kvm.used_memslots == 2


def test_unknown_memdev_and_dimm_slots(plan_machine: PlanFactory) -> None:
    with pytest.raises(ConfigError, match=r"Property 'virtio-mem\.memdev' can't find value 'nope'"):
        plan_machine("4G,maxmem=8G", [], ["virtio-mem,id=v,memdev=nope"])
    objs = ["memory-backend-ram,id=a,size=1G", "memory-backend-ram,id=b,size=1G"]
    with pytest.raises(MemoryDeviceError, match="no slots where allocated"):
        plan_machine("4G,maxmem=8G", objs, ["pc-dimm,id=d,memdev=a"])
    with pytest.raises(MemoryDeviceError, match="no free slots available"):
        plan_machine("4G,slots=1,maxmem=8G", objs, ["pc-dimm,id=d,memdev=a", "pc-dimm,memdev=b"])
    m = plan_machine("4G,slots=2,maxmem=8G", objs, ["pc-dimm,id=d,memdev=a", "pc-dimm,memdev=b"])
    assert len(m.memory_devices) == 2


def test_failed_device_leaves_nothing_behind(plan_machine: PlanFactory) -> None:
    m = plan_machine("4G,maxmem=8G", ["memory-backend-ram,id=a,size=1G"])
    before = (m.address_space.sections, m.kvm.used_memslots)
    from memslots.options import parse_device

    with pytest.raises(ConfigError):
        m.add_device(parse_device("virtio-mem,id=v,memdev=a,requested-size=3M"))
    assert (m.address_space.sections, m.kvm.used_memslots) == before
    assert m.backends["a"].used_by is None and m.devices == {}
    dm = m.device_memory
    assert dm is not None and (dm.required_memslots, dm.used_region_size) == (0, 0)
    m.add_device(parse_device("virtio-mem,id=v,memdev=a"))  # the backend is free again


@requires_kvm
def test_real_machine_maps_into_the_kernel() -> None:
    config = parse_machine_config(
        "1G,slots=1,maxmem=10G",
        ["memory-backend-memfd,id=d,size=1G", "memory-backend-ram,id=v,size=8G,reserve=off"],
        ["pc-dimm,id=dimm0,memdev=d", "virtio-mem,id=vmem0,memdev=v,dynamic-memslots=on"],
        accel="kvm",
    )
    with Machine(config, vm=KvmVm()) as m:
        assert m.vm.is_real
        dimm = m.devices["dimm0"]
        vmem = m.virtio_mem("vmem0")
        assert m.vm.probe_mapped(0) and m.vm.probe_mapped(dimm.get_addr())
        assert not m.vm.probe_mapped(vmem.addr)
        m.backends["d"].memory.write(0, b"dimm")
        assert m.vm.probe_mapped(dimm.get_addr() + GiB - 4096)
        assert m.kvm.used_memslots == 2  # boot RAM and the DIMM


@pytest.mark.parametrize("vendor", ["amd", "intel"])
def test_phys_bits_limit(vendor: str) -> None:
    def layout(memory: str, bits: int = 48) -> int:
        return pc_layout(
            parse_machine_memory(memory), cpu_vendor=vendor, phys_bits=bits
        ).device_memory_base

    # 300 TiB of maxmem cannot be addressed with 48 physical address bits (QEMU's check)
    with pytest.raises(
        OptionError,
        match=r"Address space limit 0xffffffffffff < 0x[0-9a-f]+ "
        r"phys-bits too low \(48\)",
    ):
        layout("4G,maxmem=300T")
    with pytest.raises(OptionError, match=r"phys-bits too low \(40\)"):
        layout("4G,maxmem=1028G", 40)
    relocated = vendor == "amd"
    assert layout("4G,maxmem=200T") == (TiB + GiB if relocated else 5 * GiB)
    # Intel: 5 GiB + 261996 GiB + 2 GiB hole - 1 < 2^48 (QEMU 7.2 on Intel accepts it);
    # AMD: relocated by 1019 GiB, past 2^48.
    if relocated:
        with pytest.raises(OptionError, match=r"phys-bits too low \(48\)"):
            layout("4G,maxmem=262000G")
    else:
        assert layout("4G,maxmem=262000G") == 5 * GiB
    # 46 bits (64 TiB) as on many Intel hosts
    with pytest.raises(OptionError, match=r"phys-bits too low \(46\)"):
        layout("4G,maxmem=64T", 46)


def test_dimm_slot_numbers_and_size_alignment(plan_machine: PlanFactory) -> None:
    objs = [
        "memory-backend-ram,id=a,size=1G",
        "memory-backend-ram,id=b,size=1G",
        "memory-backend-ram,id=odd,size=3M",
    ]
    m = plan_machine(
        "4G,slots=2,maxmem=8G", objs, ["pc-dimm,id=d,memdev=a,slot=1", "pc-dimm,id=e,memdev=b"]
    )
    assert (m.devices["d"].slot, m.devices["e"].slot) == (1, 0)  # type: ignore[attr-defined]
    with pytest.raises(MemoryDeviceError, match=r"invalid slot number 5, valid range is \[0-1\]"):
        plan_machine("4G,slots=2,maxmem=8G", objs, ["pc-dimm,id=d,memdev=a,slot=5"])
    with pytest.raises(MemoryDeviceError, match="slot 1 is busy"):
        plan_machine(
            "4G,slots=2,maxmem=8G",
            objs,
            ["pc-dimm,id=d,memdev=a,slot=1", "pc-dimm,id=e,memdev=b,slot=1"],
        )
    # QEMU 9.0's check: a DIMM of 3 MiB of anonymous RAM (2 MiB aligned) makes no sense
    with pytest.raises(MemoryDeviceError, match="backend memory size must be multiple of 0x200000"):
        plan_machine("4G,slots=2,maxmem=8G", objs, ["pc-dimm,id=o,memdev=odd"])


def test_a_machine_that_cannot_start_leaves_mem_path_files_as_they_were(tmp_path: Path) -> None:
    """The command line: a device refusing its backend fails the machine, and neither the
    empty file grown for the backend nor a file created for it stays changed."""
    empty = tmp_path / "empty"
    empty.touch()
    os.utime(empty, ns=(1_000_000_000, 2_000_000_000))
    created = tmp_path / "created"
    config = parse_machine_config(
        "1G,maxmem=2G",
        [
            f"memory-backend-file,id=f0,size=8M,mem-path={empty},share=on",
            f"memory-backend-file,id=f1,size=8M,mem-path={created}",
        ],
        ["virtio-mem,id=v0,memdev=f0,requested-size=3M"],  # not a multiple of the block size
        accel="sim",
    )
    with pytest.raises(ConfigError, match="'requested-size' property has to be multiples"):
        Machine(config)
    st = empty.stat()
    assert (st.st_size, st.st_mtime_ns) == (0, 2_000_000_000)
    assert not created.exists()


def test_command_line_file_backend_smaller_than_size_is_refused_untouched(
    tmp_path: Path,
) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"\x01" * 1500)
    config = parse_machine_config(
        "1G,maxmem=2G", [f"memory-backend-file,id=f0,size=8M,mem-path={small}"], [], accel="sim"
    )
    with pytest.raises(HostMemoryError, match=r"^backing store size 0x5dc does not match"):
        Machine(config)
    assert small.read_bytes() == b"\x01" * 1500
