"""vhost back-ends as memslot consumers: the plan model, vhost-kernel, and QEMU's refusals."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
from conftest import PlanFactory, requires_vhost_net

from memslots.devices.budget import UINT_MAX, MemslotBudget, PreciseAccounting
from memslots.devices.virtio_mem.device import VirtioMem
from memslots.devices.virtio_mem.wire import ReqType, Request, Resp, Response
from memslots.errors import VhostError, VhostLimitError
from memslots.guest.inorder import drive_to
from memslots.host.memory import RamBackend
from memslots.host.vhost import parse_max_mem_regions, vhost_kernel_memslots_limit
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.memory.address_space import AddressSpace, MemoryRegion, Section
from memslots.memory.backends import PlannedMemory
from memslots.options import parse_backend, parse_device, parse_machine_config
from memslots.sizes import GiB, MiB
from memslots.vhost.backend import VhostModel
from memslots.vhost.kernel import (
    KernelRegion,
    VhostKernelConsumer,
    VhostKernelModel,
    VhostNet,
    pack_vhost_memory,
)


def section(kind: str, gpa: int = 0) -> Section:
    mem = PlannedMemory(parse_backend(f"memory-backend-{kind},id=x,size=1G"))
    return Section(gpa, mem.size, mem, 0, "x")


def test_kernel_counts_all_ram_user_only_fd_backed() -> None:
    kernel, user = VhostModel("k", 64), VhostModel("u", 32, kind="user")
    for consumer in (kernel, user):
        consumer.region_add(section("ram"))
        consumer.region_add(section("memfd", 1 << 30))
    assert kernel.used_memslots == 2 and user.used_memslots == 1


def empty_budget() -> MemslotBudget:
    return MemslotBudget(AddressSpace("memory", MemoryRegion.container("system", 1 << 40)), None)


def test_limit_and_set() -> None:
    v = VhostModel("k", 1)
    v.region_add(section("ram"))
    with pytest.raises(VhostError, match="all 1 are in use"):
        v.region_add(section("ram", 1 << 30))
    s = empty_budget()
    assert (s.vhost_max_memslots(), s.vhost_free_memslots()) == (UINT_MAX, UINT_MAX)
    s.add_vhost(v)
    s.add_vhost(VhostModel("big", 509))
    assert (s.vhost_max_memslots(), s.vhost_free_memslots()) == (1, 0)
    with pytest.raises(VhostError, match="kind must be one of"):
        VhostModel("x", 8, kind="vdpa")


def test_precise_backends_leave_the_max_to_the_others() -> None:
    s = empty_budget()
    s.add_vhost(VhostModel("small", 32, kind="user"), PreciseAccounting())
    assert (s.vhost_max_memslots(), s.vhost_free_memslots()) == (UINT_MAX, 32)
    s.add_vhost(VhostModel("kernel", 64))
    assert (s.vhost_max_memslots(), s.vhost_free_memslots()) == (64, 32)


# -- the vhost module's max_mem_regions ---------------------------------------------------------


@pytest.mark.parametrize(
    "text,value",
    [
        ("509\n", 509),
        ("64", 64),
        ("  +128\n", 128),
        ("12abc", 12),  # strtoull stops at the first non-digit
        ("0\n", None),
        ("", None),
        ("abc\n", None),
        ("18446744073709551616", None),  # overflows 64 bits (ERANGE)
        ("4294967360", 64),  # fits 64 bits, then QEMU's int keeps the low 32
        ("2147483648", -(1 << 31)),
        ("-1", -1),  # strtoull negates modulo 2^64; the int is -1
    ],
)
def test_parse_max_mem_regions(text: str, value: int | None) -> None:
    assert parse_max_mem_regions(text) == value


def test_vhost_kernel_limit_from_sysfs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "max_mem_regions"
    with caplog.at_level(logging.WARNING, logger="memslots.host.vhost"):
        assert vhost_kernel_memslots_limit(str(path)) == 64  # missing: silently the default
        assert caplog.records == []
        path.write_text("509\n")
        assert vhost_kernel_memslots_limit(str(path)) == 509
        path.write_text("lots\n")
        assert vhost_kernel_memslots_limit(str(path)) == 64
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring invalid max_mem_regions value in vhost module: lots"
    ]


def test_pack_vhost_memory() -> None:
    buf = pack_vhost_memory([KernelRegion(0x1000, 0x2000, 0x7F00_0000_0000)])
    assert isinstance(buf, bytearray) and len(buf) == 8 + 32
    assert struct.unpack("<II", buf[:8]) == (1, 0)
    assert struct.unpack("<QQQQ", buf[8:]) == (0x1000, 0x2000, 0x7F00_0000_0000, 0)
    assert pack_vhost_memory([]) == bytearray(8)


def test_kernel_model_refuses_like_the_kernel() -> None:
    model = VhostKernelModel(2)
    regions = [KernelRegion(i * GiB, GiB, (1 << 40) + i * GiB) for i in range(3)]
    model.set_mem_table(regions[:2])
    with pytest.raises(VhostError, match="Argument list too long"):
        model.set_mem_table(regions)
    assert model.table == tuple(regions[:2])  # unchanged, as the kernel leaves it
    with pytest.raises(VhostError, match="Invalid argument"):
        model.set_mem_table([KernelRegion(0, 0, 1 << 40)])


@requires_vhost_net
def test_real_vhost_net_takes_a_memory_table() -> None:
    with RamBackend("vnet", 4 * MiB) as mem:
        dev = VhostNet()
        try:
            dev.set_mem_table([KernelRegion(0, mem.size, mem.host_addr)])
            dev.set_mem_table([])
        finally:
            dev.close()


# -- vhost-kernel on a machine ------------------------------------------------------------------


def sim_machine(memory: str, objects: list[str] | None = None) -> Machine:
    return Machine(parse_machine_config(memory, objects or [], [], accel="sim"), vm=KvmModel())


def kernel_consumer(
    limit: int, device_limit: int | None = None
) -> tuple[VhostKernelConsumer, VhostKernelModel]:
    model = VhostKernelModel(limit if device_limit is None else device_limit)
    return VhostKernelConsumer("vhost-net0", model, limit=limit), model


def add_virtio_mem(m: Machine, how: str = "dynamic-memslots=on") -> VirtioMem:
    dev = m.add_device(parse_device(f"virtio-mem,id=vm0,memdev=mem0,{how}"))
    assert isinstance(dev, VirtioMem)
    return dev


def test_vhost_kernel_follows_every_ram_section() -> None:
    with sim_machine("4G,maxmem=12G", ["memory-backend-ram,id=mem0,size=8G"]) as m:
        vk, model = kernel_consumer(64)
        m.budget.attach_vhost(vk)
        # Anonymous boot RAM counts for vhost-kernel (it would not for vhost-user).
        assert vk.used_memslots == 2 and len(model.table) == 2
        dev = add_virtio_mem(m)
        assert dev.nb_memslots == 1  # 64 < 509: QEMU's decision gives one memslot
        drive_to(dev, 2 * GiB)
        want = [KernelRegion(s.gpa, s.size, s.host_addr) for s in m.address_space.sections]
        assert vk.table == want and list(model.table) == want and vk.used_memslots == 3
        drive_to(dev, 0)
        assert len(model.table) == 2
        m.budget.detach_vhost(vk)
        assert m.budget.vhost_backends == [] and len(model.table) == 0


def test_vhost_kernel_full_table_answers_busy() -> None:
    with sim_machine("4G,maxmem=12G", ["memory-backend-ram,id=mem0,size=8G"]) as m:
        vk, model = kernel_consumer(3)
        m.budget.attach_vhost(vk)
        dev = add_virtio_mem(m)
        vk.other_used = 1  # something outside the model took the last region meanwhile
        dev.set_requested_size(2 * GiB)
        resp = dev.handle_request(Request(ReqType.PLUG, dev.addr, 8).pack())
        assert Response.unpack(resp).type == Resp.BUSY
        assert dev.size == 0 and dev.mapped_memslots == 0 and len(m.kvm.slots()) == 2
        vk.other_used = 0
        drive_to(dev, 2 * GiB)
        assert len(model.table) == 3


def test_vhost_kernel_device_failure_rolls_back() -> None:
    with sim_machine("4G,maxmem=12G", ["memory-backend-ram,id=mem0,size=8G"]) as m:
        # The kernel allows fewer than we were told.
        vk, model = kernel_consumer(64, device_limit=2)
        m.budget.attach_vhost(vk)
        dev = add_virtio_mem(m)
        dev.set_requested_size(2 * GiB)
        resp = dev.handle_request(Request(ReqType.PLUG, dev.addr, 8).pack())
        assert Response.unpack(resp).type == Resp.BUSY
        assert vk.used_memslots == 2 and len(model.table) == 2 and len(m.kvm.slots()) == 2


AUTO = "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"


def test_refused_after_an_auto_decision(plan_machine: PlanFactory) -> None:
    m = plan_machine("4G,maxmem=1028G", ["memory-backend-ram,id=mem0,size=1T,reserve=off"], [AUTO])
    dev = m.virtio_mem("vmem0")
    assert dev.nb_memslots == 256
    vk, model = kernel_consumer(64)
    with pytest.raises(VhostLimitError) as info:
        m.budget.attach_vhost(vk)
    assert str(info.value) == (
        "some memory device (like virtio-mem) decided how many memory slots to use based on the "
        "overall number of memory slots; this vhost backend would further restricts the overall "
        "number of memory slots: vhost back-end 'vhost-net0' supports 64 memory slots, fewer "
        "than 509\nTry plugging this vhost backend before plugging such memory devices."
    )
    assert (
        info.value.hint == "Try plugging this vhost backend before plugging such memory devices.\n"
    )
    assert (info.value.backend, info.value.limit) == ("vhost-net0", 64)
    drive_to(dev, 8 * GiB)
    # It is not listening, and it never got a table.
    assert m.budget.vhost_backends == [] and vk.used_memslots == 0 and model.calls == 0
    # 509 passes the first check, and 2 boot + 2 mapped + 254 reserved memslots fit in it.
    ok, ok_model = kernel_consumer(509)
    m.budget.attach_vhost(ok)
    assert ok.used_memslots == 4 and len(ok_model.table) == 4


def test_refused_when_used_and_reserved_exceed_the_limit(plan_machine: PlanFactory) -> None:
    # A fixed memslot size reserves 1024 memslots; 509 passes the first check, not the second.
    m = plan_machine(
        "4G,maxmem=6G",
        ["memory-backend-ram,id=mem0,size=2G"],
        ["virtio-mem,id=vmem0,memdev=mem0,memslot-size=2M"],
    )
    vk, model = kernel_consumer(509)
    with pytest.raises(VhostLimitError) as info:
        m.budget.attach_vhost(vk)
    assert str(info.value) == (
        "vhost backend memory slots limit (509) is less than current number of used (2) and "
        "reserved (1024) memory slots for memory devices. (vhost back-end 'vhost-net0', QEMU's "
        "accounting)"
    )
    drive_to(m.virtio_mem("vmem0"), 4 * MiB)
    assert m.budget.vhost_backends == [] and vk.used_memslots == 0 and model.calls == 0
    bare = empty_budget()  # without device memory nothing is reserved
    bare.add_vhost(vk)
    bare.check_vhost_reservations(vk)
