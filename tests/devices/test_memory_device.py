"""The memory-device layer: QEMU's decision, budgets, refusals and address assignment.

The first table is the reference's worked examples (docs/reference/memslot-decision.md §7), which
were derived from QEMU's rules, not from this code. The other cases were derived by hand from the
same rules.
"""

from __future__ import annotations

import pytest
from conftest import PlanFactory

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import MemoryDeviceError, NotEnoughMemslotsError
from memslots.sizes import GiB, MiB, TiB

# (row, ram area, device size, block, kvm max/free, vhost (max, free, kind), dynamic,
#  limit, N, memslot size, last memslot size)
WORKED = [
    (1, "1T", "1T", None, (32764, 32752), None, True, 256, 256, 4 * GiB, 4 * GiB),
    (2, "1T", "1T", None, (32764, 32752), None, False, 256, 1, 1 * TiB, 1 * TiB),
    (3, "1T", "512G", None, (32764, 32752), None, True, 128, 128, 4 * GiB, 4 * GiB),
    (4, "1T", "16G", None, (32764, 32752), None, True, 4, 4, 4 * GiB, 4 * GiB),
    (5, "1T", "300G", None, (32764, 32752), None, True, 75, 75, 4 * GiB, 4 * GiB),
    (6, "700G", "100G", None, (32764, 32752), None, True, 36, 36, 2846 * MiB, 2790 * MiB),
    (7, "1T", "8G", None, (32764, 32752), None, True, 2, 2, 4 * GiB, 4 * GiB),
    (8, "1T", "4G", None, (32764, 32752), None, True, 1, 1, 4 * GiB, 4 * GiB),
    (9, "1T", "1G", None, (32764, 32752), None, True, 1, 1, 1 * GiB, 1 * GiB),
    (10, "512M", "512M", None, (32764, 32752), None, True, 256, 1, 512 * MiB, 512 * MiB),
    (11, "1536M", "1536M", None, (32764, 32752), None, True, 256, 2, 1 * GiB, 512 * MiB),
    (12, "4G", "3G", None, (32764, 32752), None, True, 192, 3, 1 * GiB, 1 * GiB),
    (13, "1T", "1T", "8G", (32764, 32752), None, True, 256, 128, 8 * GiB, 8 * GiB),
    (14, "1T", "64G", "1G", (32764, 32752), None, True, 16, 16, 4 * GiB, 4 * GiB),
    (15, "100G", "100G", "512M", (512, 500), None, True, 256, 100, 1 * GiB, 1 * GiB),
    (16, "1T", "1T", None, (509, 497), None, True, 256, 256, 4 * GiB, 4 * GiB),
    (17, "1T", "1T", None, (508, 496), None, True, 1, 1, 1 * TiB, 1 * TiB),
    (18, "1T", "1T", None, (32764, 32752), (64, 54, "kernel"), True, 1, 1, 1 * TiB, 1 * TiB),
    (19, "1T", "1T", None, (32764, 32752), (8, 5, "user"), True, 1, 1, 1 * TiB, 1 * TiB),
    (20, "1T", "1T", None, (32764, 32752), (512, 504, "user"), True, 256, 256, 4 * GiB, 4 * GiB),
]

AREA_MAXMEM = {
    "1T": "1028G",
    "700G": "704G",
    "512M": "4608M",
    "1536M": "5632M",
    "4G": "8G",
    "100G": "104G",
}


@pytest.mark.parametrize(
    "row,area,size,block,kvm,vhost,dyn,limit,n,memslot,last",
    WORKED,
    ids=[f"row{r[0]}" for r in WORKED],
)
def test_worked_examples(
    plan_machine: PlanFactory,
    row: int,
    area: str,
    size: str,
    block: str | None,
    kvm: tuple[int, int],
    vhost: tuple[int, int, str] | None,
    dyn: bool,
    limit: int,
    n: int,
    memslot: int,
    last: int,
) -> None:
    dev = f"virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots={'on' if dyn else 'off'}"
    if block:
        dev += f",block-size={block}"
    kwargs = dict(kvm_max=kvm[0], kvm_free=kvm[1], vhost=vhost)
    obj = f"memory-backend-ram,id=mem0,size={size},reserve=off"
    # Row 13's 8 GiB alignment only fits when DIMM slots add room (1 GiB each) to the area,
    # which does not change the total space the decision divides.
    memory = f"4G,{'slots=7,' if block == '8G' else ''}maxmem={AREA_MAXMEM[area]}"
    probe = plan_machine(memory, [obj], **kwargs)
    assert probe.device_memory is not None
    assert probe.budget.decision_limit(probe.backends["mem0"].size) == limit

    m = plan_machine(memory, [obj], [dev], **kwargs)
    vmem = m.virtio_mem("vmem0")
    assert vmem.decided_memslots == n
    assert (vmem.memslot_size if dyn and n > 1 else vmem.region_size) == memslot
    assert vmem.last_memslot_size == last
    assert (n - 1) * memslot + last == vmem.region_size
    assert m.device_memory is not None
    assert m.device_memory.required_memslots == n
    assert m.device_memory.auto_decision == (dyn and n > 1)


def test_second_device_shares_the_remaining_area(plan_machine: PlanFactory) -> None:
    m = plan_machine(
        "4G,maxmem=1028G",
        [
            "memory-backend-ram,id=a,size=512G",
            "memory-backend-ram,id=b,size=512G",
            "memory-backend-ram,id=c,size=4G",
        ],
        [
            "virtio-mem,id=va,memdev=a,dynamic-memslots=on",
            "virtio-mem,id=vb,memdev=b,dynamic-memslots=on",
        ],
    )
    # a: 256 * 512/1024 = 128; b: min(256-128, free-128) * 512G/512G = 128.
    assert m.virtio_mem("va").nb_memslots == 128
    assert m.virtio_mem("vb").nb_memslots == 128
    dm = m.device_memory
    assert dm is not None
    assert (dm.required_memslots, dm.used_memslots, dm.reserved_memslots) == (256, 0, 256)
    assert m.budget.decision_limit(4 * GiB) == 1  # soft limit of 256 reached


def test_dimm_first_then_virtio_mem(plan_machine: PlanFactory) -> None:
    m = plan_machine(
        "4G,slots=1,maxmem=1032G",
        ["memory-backend-ram,id=d,size=4G", "memory-backend-ram,id=v,size=1T"],
        ["pc-dimm,id=dimm0,memdev=d", "virtio-mem,id=vmem0,memdev=v,dynamic-memslots=on"],
    )
    # area 1028 GiB; the DIMM takes 1 memslot (used at once): limit 255 * 1024/1024 = 255;
    # 1 TiB / 255 = 4112.06 MiB -> aligned up to 2 MiB: 4114 MiB; ceil(1048576/4114) = 255.
    vmem = m.virtio_mem("vmem0")
    assert vmem.nb_memslots == 255
    assert vmem.memslot_size == 4114 * MiB
    assert vmem.last_memslot_size == (1048576 - 254 * 4114) * MiB
    dm = m.device_memory
    assert dm is not None
    assert (dm.required_memslots, dm.used_memslots) == (256, 1)
    dimm = m.devices["dimm0"]
    assert dimm.get_addr() == dm.base
    assert vmem.addr == dm.base + 4 * GiB


def test_free_memslots_cap_the_decision(plan_machine: PlanFactory) -> None:
    m = plan_machine(
        "4G,maxmem=1028G",
        ["memory-backend-ram,id=v,size=1T"],
        ["virtio-mem,id=vmem0,memdev=v,dynamic-memslots=on"],
        kvm_max=600,
        kvm_free=100,
    )
    # min(256, 100) = 100; 1 TiB/100 = 10485.76 MiB -> 10486 MiB; ceil(1048576/10486) = 100.
    vmem = m.virtio_mem("vmem0")
    assert (vmem.nb_memslots, vmem.memslot_size) == (100, 10486 * MiB)
    assert vmem.last_memslot_size == (1048576 - 99 * 10486) * MiB


def test_reserved_memslots_refuse_a_later_dimm(plan_machine: PlanFactory) -> None:
    objs = [
        "memory-backend-ram,id=v,size=1T",
        "memory-backend-ram,id=d0,size=1G",
        "memory-backend-ram,id=d1,size=1G",
    ]
    devs = ["virtio-mem,id=vmem0,memdev=v,dynamic-memslots=on", "pc-dimm,id=dimm0,memdev=d0"]
    # area 1026 GiB: 100 * 1024/1026 = 99.8 -> 99 memslots, all reserved.
    m = plan_machine("4G,slots=2,maxmem=1030G", objs, devs, kvm_max=600, kvm_free=100)
    assert m.virtio_mem("vmem0").nb_memslots == 99
    assert m.kvm.free_memslots == 99  # the first DIMM fit exactly: 1 + 99 <= 100
    with pytest.raises(NotEnoughMemslotsError, match=r"^hypervisor has not enough free memory"):
        plan_machine(
            "4G,slots=2,maxmem=1030G",
            objs,
            [*devs, "pc-dimm,id=dimm1,memdev=d1"],
            kvm_max=600,
            kvm_free=100,
        )


def test_vhost_free_memslots_refuse(plan_machine: PlanFactory) -> None:
    objs = [
        "memory-backend-ram,id=v,size=1T",
        "memory-backend-ram,id=d0,size=1G",
        "memory-backend-ram,id=d1,size=1G",
    ]
    devs = [
        "virtio-mem,id=vmem0,memdev=v,dynamic-memslots=on",
        "pc-dimm,id=dimm0,memdev=d0",
        "pc-dimm,id=dimm1,memdev=d1",
    ]
    # vhost 50 free: 50 * 1024/1026 -> 49 reserved; dimm0 fits (1 + 49 <= 50) and uses one
    # vhost region; dimm1 needs 1 + 49 with 49 free.
    with pytest.raises(NotEnoughMemslotsError) as info:
        plan_machine("4G,slots=2,maxmem=1030G", objs, devs, vhost=(600, 50, "kernel"))
    assert str(info.value).startswith("a used vhost backend has not enough free memory slots")
    assert "'dimm1'" in str(info.value)
    assert (info.value.needed, info.value.free) == (50, 49)


def test_device_exactly_filling_total_area_gets_all_then_no_space(
    plan_machine: PlanFactory,
) -> None:
    objs = ["memory-backend-ram,id=d,size=4G", "memory-backend-ram,id=v,size=1028G"]
    with pytest.raises(
        MemoryDeviceError,
        match="not enough space, currently 0x100000000 in use "
        "of total space for memory devices 0x10100000000",
    ):
        plan_machine(
            "4G,slots=1,maxmem=1032G",
            objs,
            ["pc-dimm,id=dimm0,memdev=d", "virtio-mem,id=vmem0,memdev=v"],
        )


def test_no_maxmem_no_memory_devices(plan_machine: PlanFactory) -> None:
    with pytest.raises(MemoryDeviceError, match="consider specifying the maxmem option"):
        plan_machine("4G", ["memory-backend-ram,id=v,size=1G"], ["virtio-mem,id=x,memdev=v"])


def test_memdev_must_be_set(plan_machine: PlanFactory) -> None:
    with pytest.raises(MemoryDeviceError.__mro__[1], match="'memdev' property must be set"):
        plan_machine("4G,maxmem=8G", [], ["virtio-mem,id=x"])


def test_explicit_address_rules(plan_machine: PlanFactory) -> None:
    objs = ["memory-backend-ram,id=a,size=1G", "memory-backend-ram,id=b,size=1G"]
    m = plan_machine("4G,maxmem=8G", objs[:1], ["virtio-mem,id=x,memdev=a"])
    base = m.virtio_mem("x").addr
    with pytest.raises(MemoryDeviceError, match="address must be aligned to 0x200000 bytes"):
        plan_machine("4G,maxmem=8G", objs[:1], [f"virtio-mem,id=x,memdev=a,memaddr={base + 4096}"])
    with pytest.raises(
        MemoryDeviceError, match="address range conflicts with memory device id='x'"
    ):
        plan_machine(
            "4G,maxmem=8G",
            objs,
            ["virtio-mem,id=x,memdev=a", f"virtio-mem,id=y,memdev=b,memaddr={base}"],
        )
    with pytest.raises(MemoryDeviceError, match="can't add memory device \\[0x"):
        plan_machine("4G,maxmem=8G", objs[:1], [f"virtio-mem,id=x,memdev=a,memaddr={base - GiB}"])


def test_unplug_gives_accounting_back(plan_machine: PlanFactory) -> None:
    m = plan_machine(
        "4G,maxmem=1028G",
        ["memory-backend-ram,id=v,size=512G"],
        ["virtio-mem,id=vmem0,memdev=v,dynamic-memslots=on"],
    )
    dm = m.device_memory
    assert dm is not None and dm.auto_decision
    m.remove_device("vmem0")
    assert (dm.required_memslots, dm.used_region_size, dm.auto_decision) == (0, 0, False)
    assert isinstance(m.backends["v"].used_by, type(None))
    assert not isinstance(m.devices.get("vmem0"), VirtioMem)
