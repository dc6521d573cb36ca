"""The real accelerator on /dev/kvm, and KvmModel checked against it operation by operation."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import mmap
import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import requires_kvm, requires_memcg
from hypothesis import given, settings
from hypothesis import strategies as st
from kmem_support import Stressor

from memslots.errors import KvmError, KvmUnavailableError
from memslots.host.kmem import open_meter
from memslots.kvm import abi
from memslots.kvm.abi import (
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_USER_MEMORY,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    VmBackend,
    make_slot,
)
from memslots.kvm.cost import slot_memcg_bytes
from memslots.kvm.host import detect_host_mmu
from memslots.kvm.model import KvmModel
from memslots.kvm.system import kvm_available, read_max_memslots
from memslots.kvm.vm import KvmVm
from memslots.sizes import GiB, MiB, TiB

needs_kvm = requires_kvm

# Python 3.11's mmap module lacks the constant; 0x4000 is its value on Linux.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
HOST_BUF = 16 * MiB


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _anon(size: int) -> mmap.mmap:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    return mmap.mmap(-1, size, flags=flags)


@pytest.fixture(scope="module")
def host_addr() -> Iterator[int]:
    buf = _anon(HOST_BUF)
    yield _address(buf)
    buf.close()


@pytest.fixture
def vm() -> Iterator[KvmVm]:
    with KvmVm() as v:
        yield v


# docs/reference/kvm-memslot-cost.md A1: the ioctl encodings as the kernel headers spell them out.
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (abi.KVM_CREATE_VM, 0xAE01),
        (abi.KVM_CHECK_EXTENSION, 0xAE03),
        (abi.KVM_GET_DIRTY_LOG, 0x4010AE42),
        (abi.KVM_SET_USER_MEMORY_REGION, 0x4020AE46),
        (abi.KVM_SET_USER_MEMORY_REGION2, 0x40A0AE49),
        (abi.KVM_ENABLE_CAP, 0x4068AEA3),
        (abi.KVM_CLEAR_DIRTY_LOG, 0xC018AEC0),
    ],
)
def test_ioctl_numbers(value: int, expected: int) -> None:
    assert value == expected


def test_enable_cap_layout() -> None:
    """struct kvm_enable_cap: cap, flags (0), args[4], pad[64]; one helper for every cap."""
    raw = abi.pack_enable_cap(abi.KVM_CAP_DISABLE_QUIRKS2, abi.KVM_X86_QUIRK_SLOT_ZAP_ALL)
    assert len(raw) == 104
    assert int.from_bytes(raw[0:4], sys.byteorder) == abi.KVM_CAP_DISABLE_QUIRKS2
    assert int.from_bytes(raw[4:8], sys.byteorder) == 0
    assert int.from_bytes(raw[8:16], sys.byteorder) == abi.KVM_X86_QUIRK_SLOT_ZAP_ALL
    assert raw[16:] == bytes(88)
    with pytest.raises(ValueError, match="four arguments"):
        abi.pack_enable_cap(1, 1, 2, 3, 4, 5)


def test_region_struct_layouts() -> None:
    region = abi.UserspaceMemoryRegion(
        slot=make_slot(1, 7),
        flags=KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr=0x1_0000_0000,
        memory_size=2 * MiB,
        userspace_addr=0x7F00_0000_0000,
    )
    v1 = region.pack()
    assert len(v1) == 32
    assert int.from_bytes(v1[0:4], sys.byteorder) == (1 << 16) | 7
    assert int.from_bytes(v1[4:8], sys.byteorder) == KVM_MEM_LOG_DIRTY_PAGES
    assert int.from_bytes(v1[8:16], sys.byteorder) == 0x1_0000_0000
    assert int.from_bytes(v1[16:24], sys.byteorder) == 2 * MiB
    assert int.from_bytes(v1[24:32], sys.byteorder) == 0x7F00_0000_0000
    assert abi.UserspaceMemoryRegion.unpack(v1) == region

    gmem = dataclasses.replace(region, guest_memfd_offset=0x3000, guest_memfd=5)
    v2 = gmem.pack2()
    assert len(v2) == 160
    assert v2[:32] == v1  # the common fields are identical
    assert int.from_bytes(v2[32:40], sys.byteorder) == 0x3000
    assert int.from_bytes(v2[40:44], sys.byteorder) == 5
    assert v2[44:] == bytes(116)
    assert abi.UserspaceMemoryRegion.unpack2(v2) == gmem
    with pytest.raises(ValueError, match="region2"):
        gmem.pack()


@pytest.mark.parametrize(
    "fields",
    [
        {"slot": 1 << 32},
        {"flags": -1},
        {"guest_phys_addr": 1 << 64},
        {"memory_size": -4096},
        {"guest_memfd": 1 << 32},
    ],
)
def test_region_fields_must_fit(fields: dict[str, int]) -> None:
    base = {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0}
    with pytest.raises(ValueError, match=next(iter(fields))):
        abi.UserspaceMemoryRegion(**(base | fields))


def test_slot_split() -> None:
    assert abi.split_slot(make_slot(1, 32763)) == (1, 32763)
    assert abi.split_slot(0x2_FFFF) == (2, 0xFFFF)
    assert abi.X86_USER_MEM_SLOTS == 32764


def test_missing_device_is_unavailable(tmp_path: Path) -> None:
    missing = str(tmp_path / "kvm")
    assert not kvm_available(missing)
    with pytest.raises(KvmUnavailableError) as info:
        KvmVm(missing)
    assert info.value.errno == errno.ENOENT
    assert missing in str(info.value)


def test_non_kvm_device_is_unavailable() -> None:
    assert not kvm_available("/dev/null")


@needs_kvm
def test_capabilities(vm: KvmVm) -> None:
    assert vm.is_real is True
    assert vm.check_extension(KVM_CAP_USER_MEMORY) == 1
    assert vm.max_memslots == vm.check_extension(KVM_CAP_NR_MEMSLOTS)
    assert vm.nr_address_spaces >= 1
    assert vm.mmu == detect_host_mmu()
    if platform.machine() == "x86_64":
        # 32767 - 3 internal slots since Linux 5.12 (docs/reference/kvm-memslot-cost.md A2).
        assert vm.max_memslots == 32764
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    if (major, minor) >= (6, 8):
        assert vm.has_region2  # KVM_SET_USER_MEMORY_REGION2 arrived in 6.8


@needs_kvm
def test_read_max_memslots_without_a_vm(vm: KvmVm) -> None:
    assert read_max_memslots() == vm.max_memslots


def test_read_max_memslots_missing_device(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailableError):
        read_max_memslots(str(tmp_path / "kvm"))


@needs_kvm
def test_fd_and_close(vm: KvmVm) -> None:
    fd = vm.fileno()
    assert fd == vm.vm_fd
    os.fstat(fd)
    vm.close()
    vm.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(KvmError) as info:
        vm.set_memory_region(0, 0, 4096, 0)
    assert info.value.errno == errno.EBADF


@needs_kvm
@pytest.mark.parametrize("v1", [False, True], ids=["region2", "region-v1"])
def test_create_probe_delete(vm: KvmVm, host_addr: int, v1: bool) -> None:
    if v1:
        vm.has_region2 = False  # exercise KVM_SET_USER_MEMORY_REGION
    vm.set_memory_region(0, GiB, 4 * MiB, host_addr)
    vm.set_memory_region(1, GiB + 4 * MiB, 2 * MiB, host_addr + 4 * MiB, KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.probe_mapped(GiB)
    assert vm.probe_mapped(GiB + 6 * MiB - 1)
    assert not vm.probe_mapped(GiB + 6 * MiB)
    assert not vm.probe_mapped(GiB - 4096)
    vm.delete_memory_region(0)
    assert not vm.probe_mapped(GiB)
    assert vm.probe_mapped(GiB + 4 * MiB)
    # Probing left no scratch slot behind: the same gpa can be probed again and used.
    vm.set_memory_region(2, GiB, 4096, host_addr)
    assert vm.probe_mapped(GiB)


@needs_kvm
def test_overlap_is_eexist(vm: KvmVm, host_addr: int) -> None:
    vm.set_memory_region(0, GiB, 4 * MiB, host_addr)
    with pytest.raises(KvmError) as info:
        vm.set_memory_region(1, GiB + 2 * MiB, 4 * MiB, host_addr)
    assert info.value.errno == errno.EEXIST
    text = str(info.value)
    for part in ("set_memory_region", "memslot 1", "0x40200000", "4 MiB", "EEXIST"):
        assert part in text
    vm.set_memory_region(1, GiB + 4 * MiB, 4 * MiB, host_addr)


@needs_kvm
def test_delete_absent_is_einval(vm: KvmVm, host_addr: int) -> None:
    with pytest.raises(KvmError) as info:
        vm.delete_memory_region(9)
    assert info.value.errno == errno.EINVAL
    assert "delete_memory_region" in str(info.value) and "memslot 9" in str(info.value)
    vm.set_memory_region(9, 0, 4096, host_addr)
    vm.delete_memory_region(9)
    with pytest.raises(KvmError):
        vm.delete_memory_region(9)


@needs_kvm
def test_slot_id_limit(vm: KvmVm, host_addr: int) -> None:
    vm.set_memory_region(vm.max_memslots - 2, 0, 4096, host_addr)
    with pytest.raises(KvmError) as info:
        vm.set_memory_region(vm.max_memslots, GiB, 4096, host_addr)
    assert info.value.errno == errno.EINVAL


@needs_kvm
def test_probe_with_scratch_slot_in_use(vm: KvmVm, host_addr: int) -> None:
    vm.set_memory_region(vm.max_memslots - 1, 0, 4096, host_addr)
    with pytest.raises(KvmError, match="scratch slot") as info:
        vm.probe_mapped(GiB)
    assert info.value.errno == errno.EINVAL


@needs_kvm
@requires_memcg
def test_kernel_memory_matches_model_for_4gib_slot(vm: KvmVm, memslot_stressor: Stressor) -> None:
    """docs/reference/kvm-memslot-cost.md A5's 4 GiB slot, measured in a memory cgroup of our
    own (the VM is created before the meter opens, which does not matter: only the slot's own
    allocations are measured), to the page, while another process creates and deletes 64 GiB
    memslots."""
    size, gpa = 4 * GiB, 4 * GiB
    predicted = slot_memcg_bytes(gpa, size, vm.mmu)
    buf = _anon(size)
    try:
        addr = _address(buf)
        with open_meter() as meter:
            assert meter.source == "cgroup" and meter.tolerance is not None
            for _ in range(3):
                before = meter.read()
                vm.set_memory_region(0, gpa, size, addr)
                created = meter.read()
                vm.delete_memory_region(0)
                after = meter.read()
                assert abs(created - before - predicted) < meter.tolerance
                assert abs(after - before) < meter.tolerance
    finally:
        buf.close()


# Deterministic edge cases of kvm-memslot-cost.md A1, each run from an empty VM on both backends.
# Ops: ("set", slot, gpa, size, uaddr offset into the host buffer or None for 0, flags) or
# ("del", slot). "MAX" in the slot position means the VM's max_memslots.
Op = tuple[object, ...]
EDGE_CASES: dict[str, list[Op]] = {
    "unaligned-gpa": [("set", 0, 2048, 4096, 0, 0)],
    "unaligned-size": [("set", 0, 0, 6144, 0, 0)],
    "unaligned-uaddr": [("set", 0, 0, 4096, 8, 0)],
    "wrap": [("set", 0, (1 << 64) - 4096, 8192, 0, 0)],
    "max-gfn": [("set", 0, (1 << 52) - 4096, 4096, 0, 0), ("set", 1, 1 << 52, 4096, 0, 0)],
    "too-many-pages": [("set", 0, 0, 8 * TiB, None, 0)],
    "slot-id": [("set", "MAX", 0, 4096, 0, 0), ("set", make_slot(1, 0), 0, 4096, 0, 0)],
    "flags": [
        ("set", 0, 0, 4096, 0, KVM_MEM_GUEST_MEMFD),
        ("set", 0, 0, 4096, 0, 1 << 3),
        ("set", 0, 0, 4096, 0, 1 << 15),
        ("set", 0, 0, 4096, 0, 1 << 16),
        ("set", 0, 0, 4096, 0, KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES),
    ],
    "user-range": [("set", 0, 0, 4096, "TOP", 0)],
    "overlap": [
        ("set", 0, GiB, 4 * MiB, 0, 0),
        ("set", 1, GiB + 4 * MiB - 4096, 8192, 0, 0),
        ("set", 1, GiB - 4096, 4096, 0, 0),
        ("set", 2, GiB - 4096, 8 * MiB, 0, 0),
    ],
    "modify": [
        ("set", 0, GiB, 2 * MiB, 0, 0),
        ("set", 1, 2 * GiB, 2 * MiB, 0, 0),
        ("set", 0, GiB, 2 * MiB, 0, 0),
        ("set", 0, GiB, 4 * MiB, 0, 0),
        ("set", 0, GiB, 2 * MiB, 4096, 0),
        ("set", 0, GiB, 2 * MiB, 0, KVM_MEM_READONLY),
        ("set", 0, 2 * GiB - MiB, 2 * MiB, 0, 0),
        ("set", 0, GiB + MiB, 2 * MiB, 0, KVM_MEM_LOG_DIRTY_PAGES),
        ("set", 0, GiB + MiB, 2 * MiB, 0, 0),
    ],
    "delete": [("del", 3), ("set", 3, 0, 4096, 0, 0), ("del", 3), ("del", 3)],
}


def _run(backend: VmBackend, op: Op, host_addr: int) -> int | str:
    """Apply one op; 0 on success, the errno, or "ValueError" for a refused argument."""
    slot = backend.max_memslots if op[1] == "MAX" else op[1]
    assert isinstance(slot, int)
    try:
        if op[0] == "del":
            backend.delete_memory_region(slot)
        else:
            gpa, size, offset, flags = op[2:]
            assert isinstance(gpa, int) and isinstance(size, int) and isinstance(flags, int)
            if offset is None:
                uaddr = 0
            elif offset == "TOP":
                uaddr = (1 << 47) - 4096
            else:
                assert isinstance(offset, int)
                uaddr = host_addr + offset
            backend.set_memory_region(slot, gpa, size, uaddr, flags)
    except KvmError as e:
        return e.errno
    except ValueError:
        return "ValueError"
    return 0


@needs_kvm
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_model_matches_kernel_on_edge_cases(name: str, host_addr: int) -> None:
    with KvmVm() as real:
        model = KvmModel(real.max_memslots, real.mmu, real.nr_address_spaces)
        for op in EDGE_CASES[name]:
            assert _run(model, op, host_addr) == _run(real, op, host_addr), op


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except KvmError as e:
        return ("errno", e.errno)
    except ValueError:
        return "ValueError"


GRID = 2 * MiB
_slot_index = st.integers(0, 7)
_set_op = st.tuples(
    st.just("set"),
    _slot_index,
    st.integers(0, 7),  # gpa grid cell
    st.sampled_from([4096, 2 * MiB, 4 * MiB, 6 * MiB, 0]),
    st.integers(0, 4),  # host offset in 2 MiB steps
    st.sampled_from([0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD]),
    st.sampled_from([0, 0, 0, 2048]),  # occasional misalignment of gpa or uaddr
)
_del_op = st.tuples(st.just("del"), _slot_index)
_probe_op = st.tuples(st.just("probe"), st.integers(0, 8))


def _slot(index: int, max_memslots: int) -> int:
    # Ordinary ids, the last ordinary id, the probe's scratch id, one too many, address space 1.
    choices = [0, 1, 2, 3, max_memslots - 2, max_memslots - 1, max_memslots, make_slot(1, 0)]
    return choices[index]


def _apply(backend: VmBackend, op: tuple[object, ...], host_addr: int) -> object:
    kind = op[0]
    if kind == "probe":
        cell = op[1]
        assert isinstance(cell, int)
        probe_gpa = cell * GRID + 100  # any address inside the cell's first page
        return _outcome(lambda: backend.probe_mapped(probe_gpa))
    index = op[1]
    assert isinstance(index, int)
    slot = _slot(index, backend.max_memslots)
    if kind == "del":
        return _outcome(lambda: backend.delete_memory_region(slot))
    cell, size, host_step, flags, skew = op[2:]
    assert isinstance(cell, int) and isinstance(size, int) and isinstance(host_step, int)
    assert isinstance(flags, int) and isinstance(skew, int)
    gpa = cell * GRID + (skew if host_step % 2 else 0)
    uaddr = host_addr + host_step * GRID + (0 if host_step % 2 else skew)
    return _outcome(lambda: backend.set_memory_region(slot, gpa, size, uaddr, flags))


@needs_kvm
@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.one_of(_set_op, _del_op, _probe_op), min_size=1, max_size=25))
def test_model_matches_kernel_on_random_sequences(
    ops: list[tuple[object, ...]], host_addr: int
) -> None:
    with KvmVm() as real:
        model = KvmModel(real.max_memslots, real.mmu, real.nr_address_spaces)
        for op in ops:
            assert _apply(model, op, host_addr) == _apply(real, op, host_addr), op
        for cell in range(9):
            probe = ("probe", cell)
            assert _apply(model, probe, host_addr) == _apply(real, probe, host_addr), probe
