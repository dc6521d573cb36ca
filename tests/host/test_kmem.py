"""The per-VM kernel-memory meter: finding our memory cgroup, the fallback, and the real kernel.

The real-kernel tests check the memcg model (``kvm_cost.slot_memcg_bytes``) against what KVM
charges to our own cgroup, to the page, while another process creates and deletes 64 GiB
memslots (``memslot_stressor``), which moves the host's VmallocUsed by 160 MiB at a time.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires_kvm, requires_memcg
from kmem_support import Stressor, memory_cgroup_of

from memslots.errors import MeasurementError
from memslots.host import kmem
from memslots.host.kmem import (
    CgroupLocation,
    CgroupMeter,
    CgroupUnavailable,
    KernelFigure,
    locate_memory_cgroup,
    open_meter,
    read_vmalloc_used,
)
from memslots.kvm.cost import slot_memcg_bytes, slot_metadata_bytes
from memslots.kvm.host import host_info
from memslots.kvm.mmu import MmuConfig
from memslots.kvm.vm import KvmVm
from memslots.sizes import GiB

PAGE = 4096

# -- locating the cgroup (fake /proc files) -------------------------------------------------------

MOUNTINFO_V1 = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_locate_v1(tmp_path: Path) -> None:
    cg = _write(tmp_path / "cgroup", "4:memory:/process_api/abc\n1:cpu:/\n0::/\n")
    mi = _write(tmp_path / "mountinfo", MOUNTINFO_V1)
    assert locate_memory_cgroup(cg, mi) == CgroupLocation(
        1, "/sys/fs/cgroup/memory/process_api/abc"
    )


def test_locate_v1_under_a_mount_of_a_subtree(tmp_path: Path) -> None:
    # A container sees its own cgroup mounted at the mount point; \040 is a space.
    cg = _write(tmp_path / "cgroup", "7:cpu,memory:/docker/c1/inner\n")
    mi = _write(
        tmp_path / "mountinfo",
        "35 31 0:32 /docker/c1 /sys/fs/cgroup/my\\040mem rw - cgroup cgroup rw,memory,cpu\n",
    )
    assert locate_memory_cgroup(cg, mi).path == "/sys/fs/cgroup/my mem/inner"


def test_locate_v2(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    (root / "user.slice").mkdir(parents=True)
    (root / "user.slice" / "cgroup.controllers").write_text("cpu io memory pids\n")
    cg = _write(tmp_path / "cgroup", "0::/user.slice\n")
    mi = _write(tmp_path / "mountinfo", f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n")
    assert locate_memory_cgroup(cg, mi) == CgroupLocation(2, str(root / "user.slice"))


def test_locate_v2_without_the_memory_controller(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("hugetlb\n")
    cg = _write(tmp_path / "cgroup", "0::/\n")
    mi = _write(tmp_path / "mountinfo", f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n")
    with pytest.raises(CgroupUnavailable, match="memory controller is not enabled"):
        locate_memory_cgroup(cg, mi)


def test_locate_v1_not_mounted(tmp_path: Path) -> None:
    cg = _write(tmp_path / "cgroup", "4:memory:/x\n")
    mi = _write(tmp_path / "mountinfo", "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    with pytest.raises(CgroupUnavailable, match="not mounted"):
        locate_memory_cgroup(cg, mi)


# -- the fallback and the figures -----------------------------------------------------------------


def test_read_vmalloc_used(tmp_path: Path) -> None:
    p = tmp_path / "meminfo"
    p.write_text("MemTotal: 1 kB\nVmallocUsed:     14108 kB\n")
    assert read_vmalloc_used(str(p)) == 14108 * 1024
    p.write_text("MemTotal: 1 kB\n")
    with pytest.raises(MeasurementError, match="no VmallocUsed"):
        read_vmalloc_used(str(p))


def test_falls_back_to_vmalloc_used_and_says_why(tmp_path: Path) -> None:
    cg = _write(tmp_path / "cgroup", "4:memory:/does/not/exist\n")
    mi = _write(
        tmp_path / "mountinfo", f"35 31 0:32 / {tmp_path / 'nomount'} rw - cgroup cgroup memory\n"
    )
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1 kB\nVmallocUsed:     1000 kB\n")
    with open_meter(proc_cgroup=cg, mountinfo=mi, meminfo=str(meminfo)) as meter:
        assert meter.source == "system" and meter.tolerance is None
        assert "cannot create a memory cgroup" in meter.detail
        assert "other processes" in meter.describe()
        assert kmem.current_meter() is meter
        meminfo.write_text("VmallocUsed:     1512 kB\n")
        assert meter.used() == 512 * 1024
        figure = meter.figure(meter.used())
        assert figure == KernelFigure(512 * 1024, "system") and figure.disturbed
    assert kmem.current_meter() is None


def test_system_figures_are_marked() -> None:
    assert KernelFigure(1, "cgroup").disturbed is False
    assert kmem.source_label("system") == "system*"
    assert kmem.source_label("cgroup") == "cgroup"
    note = kmem.source_footnote("system")
    assert note is not None and "other processes" in note
    assert kmem.source_footnote("cgroup") is None


def test_env_asks_for_the_system_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSLOTS_KMEM", "system")
    with open_meter() as meter:
        assert meter.source == "system"


def test_v2_own_cgroup_when_alone(tmp_path: Path) -> None:
    """cgroup v2 cannot delegate memory below a cgroup with processes; alone, we read ours."""
    own = tmp_path / "svc"
    own.mkdir()
    (own / "cgroup.controllers").write_text("memory\n")
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (own / "memory.stat").write_text("anon 4096\nkernel 1000000\nslab 300000\n")
    status = _write(tmp_path / "status", "Name: x\nVmPTE:\t      8 kB\n")
    assert kmem._alone_in(str(own), os.getpid())
    with CgroupMeter(CgroupLocation(2, str(own)), own=True, status=status) as meter:
        assert meter.source == "cgroup" and meter.read() == 1000000 - 8192
        (own / "memory.stat").write_text("kernel 1040960\n")
        assert meter.used() == 40960
        # v2 flushes memory.stat lazily: the tolerance covers the charge batch per CPU.
        assert meter.tolerance is not None and meter.tolerance >= 64 * PAGE
    assert (own / "memory.stat").exists()  # our own cgroup is not removed


def test_v2_without_a_kernel_line_sums_the_kernel_items(tmp_path: Path) -> None:
    stat = _write(tmp_path / "memory.stat", "anon 1\nslab 100\nvmalloc 20\npercpu 3\n")
    assert kmem._v2_kernel_bytes(stat) == 123


def test_not_alone_with_another_process_below(tmp_path: Path) -> None:
    (tmp_path / "child").mkdir()
    (tmp_path / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (tmp_path / "child" / "cgroup.procs").write_text("1\n")
    assert not kmem._alone_in(str(tmp_path), os.getpid())


def test_stale_children_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / "memslots-999999999-1"
    dead.mkdir()
    mine = tmp_path / f"memslots-{os.getpid()}-999"
    mine.mkdir()
    other = tmp_path / "someone-else"
    other.mkdir()
    with pytest.raises(CgroupUnavailable):
        # A plain directory is no cgroup: the child gets no counter and is removed again.
        CgroupMeter(CgroupLocation(1, str(tmp_path)))
    assert not dead.exists() and mine.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])


# -- the real kernel ------------------------------------------------------------------------------


@requires_memcg
def test_meter_moves_us_in_and_out() -> None:
    before = memory_cgroup_of()
    with open_meter() as outer:
        assert outer.source == "cgroup"
        assert isinstance(outer, CgroupMeter)
        assert memory_cgroup_of().endswith(os.path.basename(outer.path))
        with open_meter() as inner:
            assert isinstance(inner, CgroupMeter) and inner.parent == outer.path
            assert kmem.current_meter() is inner
        assert kmem.current_meter() is outer
        assert not os.path.exists(inner.path)
    assert memory_cgroup_of() == before
    assert not os.path.exists(outer.path)


@pytest.fixture
def guest_buffer() -> Iterator[int]:
    size = 64 * GiB
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    yield addr
    del addr
    buf.close()


def _mmu() -> MmuConfig:
    return host_info().mmu


@requires_kvm
@requires_memcg
def test_64g_memslot_charges_the_memcg_model_to_the_page(
    memslot_stressor: Stressor, guest_buffer: int
) -> None:
    """docs/reference/kvm-memslot-cost.md A5's slot, per VM: on shadow paging 41058 data pages +
    the 520-byte slot struct, 80 pages (the nested page-pointer arrays) below VmallocUsed's 41138
    -- whatever the stressor does to the host meanwhile."""
    gpa, size = 4 * GiB, 64 * GiB
    model = slot_memcg_bytes(gpa, size, _mmu())
    if _mmu() == MmuConfig():
        assert model == 41058 * PAGE + 520
        assert slot_metadata_bytes(gpa, size, _mmu()) - model == 80 * PAGE - 520
    with open_meter() as meter, KvmVm() as vm:
        assert meter.source == "cgroup" and meter.tolerance is not None
        for _ in range(3):
            before = meter.read()
            vm.set_memory_region(0, gpa, size, guest_buffer)
            created = meter.read()
            memslot_stressor.wait_cycles(1)  # the host's VmallocUsed moved meanwhile
            still = meter.read()
            vm.delete_memory_region(0)
            after = meter.read()
            # The slab object is charged from a per-CPU stock of whole pages: less than a page
            # per CPU (and one for the remainder) away from the byte-exact model. Another
            # cgroup allocating on the same CPU (the stressor) flushes that stock, which moves
            # our reading by the same amount, and by nothing more.
            assert abs(created - before - model) < meter.tolerance, (created - before, model)
            assert abs(still - created) < meter.tolerance
            assert abs(after - before) < meter.tolerance


@requires_kvm
@requires_memcg
def test_slot_struct_charge_over_many_small_slots(
    memslot_stressor: Stressor, guest_buffer: int
) -> None:
    """4000 4 KiB slots: 6 data pages each (3 rmaps, 2 lpage_info, write tracking on shadow
    paging) + 520 bytes each for ``struct kvm_memory_slot`` (kmalloc-cg-512 + the obj_cgroup
    pointer): 24508 pages on shadow paging. A 512-byte charge would give 24500."""
    n = 4000
    per_slot = slot_memcg_bytes(GiB, PAGE, _mmu())
    with open_meter() as meter, KvmVm() as vm:
        assert meter.tolerance is not None
        before = meter.read()
        for i in range(n):
            vm.set_memory_region(i, GiB + i * (2 << 20), PAGE, guest_buffer)
        created = meter.read()
        for i in range(n):
            vm.delete_memory_region(i)
        after = meter.read()
    grown = created - before
    assert abs(grown - n * per_slot) < meter.tolerance, (grown, n * per_slot)
    without_pointer = n * (per_slot - 8)
    assert abs(grown - without_pointer) >= meter.tolerance
    assert abs(after - before) < meter.tolerance
