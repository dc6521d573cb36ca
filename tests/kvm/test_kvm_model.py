"""KvmModel enforces kvm_set_memory_region()'s rules (docs/reference/kvm-memslot-cost.md A1) with
the kernel's errnos."""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memslots.errors import KvmError
from memslots.kvm.abi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    VmBackend,
    make_slot,
)
from memslots.kvm.cost import slot_metadata_bytes
from memslots.kvm.mmu import MmuConfig
from memslots.kvm.model import KvmModel, ModelSlot
from memslots.sizes import GiB, MiB, TiB

UADDR = 0x7F12_3400_0000  # any page-aligned user address will do for the model


def _errno_of(model: KvmModel, slot: int, gpa: int, size: int, uaddr: int, flags: int = 0) -> int:
    try:
        model.set_memory_region(slot, gpa, size, uaddr, flags)
    except KvmError as e:
        return e.errno
    return 0


def test_create_and_delete_update_table_and_counters() -> None:
    m = KvmModel()
    m.set_memory_region(3, GiB, 2 * MiB, UADDR, KVM_MEM_LOG_DIRTY_PAGES)
    assert m.slots() == {3: ModelSlot(3, GiB, 2 * MiB, UADDR, KVM_MEM_LOG_DIRTY_PAGES)}
    assert m.slots()[3].end == GiB + 2 * MiB
    assert (m.creates, m.deletes) == (1, 0)
    m.delete_memory_region(3)
    assert m.slots() == {}
    assert (m.creates, m.deletes) == (1, 1)


def test_slots_returns_a_copy() -> None:
    m = KvmModel()
    m.set_memory_region(0, 0, 4096, UADDR)
    m.slots().clear()
    assert len(m.slots()) == 1


def test_defaults_match_this_host() -> None:
    m = KvmModel()
    assert m.max_memslots == 32764
    assert m.mmu == MmuConfig()
    assert m.nr_address_spaces == 1
    assert m.is_real is False


def test_slot_id_limit() -> None:
    m = KvmModel(max_memslots=10)
    assert _errno_of(m, 10, 0, 4096, UADDR) == errno.EINVAL
    assert _errno_of(m, 9, 0, 4096, UADDR) == 0
    # Only the low 16 bits are the id; bit 16 and up select the address space.
    assert _errno_of(m, make_slot(0, 0xFFFF), 4096, 4096, UADDR) == errno.EINVAL


def test_address_spaces_are_independent() -> None:
    single = KvmModel()
    assert _errno_of(single, make_slot(1, 0), 0, 4096, UADDR) == errno.EINVAL
    smm = KvmModel(nr_address_spaces=2)
    smm.set_memory_region(make_slot(0, 0), 0, 2 * MiB, UADDR)
    # The same range and id in as_id 1 is a different slot that does not overlap.
    smm.set_memory_region(make_slot(1, 0), 0, 2 * MiB, UADDR)
    assert set(smm.slots()) == {0, 1 << 16}
    assert _errno_of(smm, make_slot(1, 1), MiB, 4096, UADDR) == errno.EEXIST
    assert _errno_of(smm, make_slot(2, 0), 0, 4096, UADDR) == errno.EINVAL


@pytest.mark.parametrize(
    ("gpa", "size", "uaddr"),
    [
        (2048, 4096, UADDR),
        (0, 4096 + 512, UADDR),
        (0, 4096, UADDR + 8),
    ],
)
def test_alignment(gpa: int, size: int, uaddr: int) -> None:
    assert _errno_of(KvmModel(), 0, gpa, size, uaddr) == errno.EINVAL


def test_wrap_and_max_gfn() -> None:
    m = KvmModel()
    assert _errno_of(m, 0, (1 << 64) - 4096, 8192, UADDR) == errno.EINVAL
    # Shadow paging: the last page below 2^52 is fine, the first page at 2^52 is not.
    assert _errno_of(m, 1, (1 << 52) - 4096, 4096, UADDR) == 0
    assert _errno_of(m, 2, 1 << 52, 4096, UADDR) == errno.EINVAL
    tdp = KvmModel(max_gpa_bits=46)
    assert _errno_of(tdp, 0, (1 << 46) - 4096, 8192, UADDR) == errno.EINVAL
    assert _errno_of(tdp, 0, (1 << 46) - 8192, 8192, UADDR) == 0


def test_page_limit_per_slot() -> None:
    m = KvmModel()
    # 2^31-1 pages (8 TiB - 4 KiB) is the largest slot; one more page is refused.
    assert _errno_of(m, 0, 0, 8 * TiB - 4096, 0) == 0
    assert _errno_of(m, 1, 16 * TiB, 8 * TiB, 0) == errno.EINVAL


def test_userspace_range_must_be_user_memory() -> None:
    m = KvmModel()
    top = (1 << 47) - 4096
    assert _errno_of(m, 0, 0, 4096, top - 4096) == 0
    assert _errno_of(m, 1, GiB, 4096, top) == errno.EINVAL
    assert _errno_of(m, 1, GiB, 8192, top - 4096) == errno.EINVAL


@pytest.mark.parametrize("flags", [1 << 3, 1 << 15, 1 << 16])
def test_invalid_flags(flags: int) -> None:
    assert _errno_of(KvmModel(), 0, 0, 4096, UADDR, flags) == errno.EINVAL


def test_guest_memfd_flag_is_refused_before_the_kernel_rules() -> None:
    m = KvmModel()
    with pytest.raises(ValueError, match="guest_memfd"):
        m.set_memory_region(0, 0, 4096, UADDR, KVM_MEM_GUEST_MEMFD)
    assert m.slots() == {}


def test_overlap_is_eexist_and_adjacent_is_fine() -> None:
    m = KvmModel()
    m.set_memory_region(0, GiB, 4 * MiB, UADDR)
    assert _errno_of(m, 1, GiB + 2 * MiB, 4 * MiB, UADDR) == errno.EEXIST
    assert _errno_of(m, 1, GiB - 2 * MiB, 2 * MiB + 4096, UADDR) == errno.EEXIST
    assert _errno_of(m, 1, GiB - 4096, 8 * MiB, UADDR) == errno.EEXIST  # covers it entirely
    assert _errno_of(m, 1, GiB + 4 * MiB, 4096, UADDR) == 0
    assert _errno_of(m, 2, GiB - 4096, 4096, UADDR) == 0
    assert m.creates == 3


def test_delete_absent_slot_is_einval() -> None:
    m = KvmModel()
    with pytest.raises(KvmError) as info:
        m.delete_memory_region(7)
    assert info.value.errno == errno.EINVAL
    m.set_memory_region(7, 0, 4096, UADDR)
    m.delete_memory_region(7)
    with pytest.raises(KvmError):
        m.delete_memory_region(7)
    assert m.deletes == 1


def test_size_zero_set_is_a_delete() -> None:
    m = KvmModel()
    m.set_memory_region(1, 0, 4096, UADDR)
    m.set_memory_region(1, 0, 0, 0)
    assert m.slots() == {}
    assert m.deletes == 1


def test_modify_rules() -> None:
    m = KvmModel()
    m.set_memory_region(0, GiB, 2 * MiB, UADDR)
    m.set_memory_region(1, 2 * GiB, 2 * MiB, UADDR)
    # Identical parameters: a no-op, not a second creation.
    m.set_memory_region(0, GiB, 2 * MiB, UADDR)
    assert m.creates == 2
    # Size, host address and READONLY cannot change.
    assert _errno_of(m, 0, GiB, 4 * MiB, UADDR) == errno.EINVAL
    assert _errno_of(m, 0, GiB, 2 * MiB, UADDR + 4096) == errno.EINVAL
    assert _errno_of(m, 0, GiB, 2 * MiB, UADDR, KVM_MEM_READONLY) == errno.EINVAL
    # A move into another slot overlaps; a move elsewhere is allowed, even onto itself shifted.
    assert _errno_of(m, 0, 2 * GiB, 2 * MiB, UADDR) == errno.EEXIST
    assert _errno_of(m, 0, GiB + MiB, 2 * MiB, UADDR) == 0
    assert m.slots()[0].gpa == GiB + MiB
    # Dirty logging on: flags only.
    assert _errno_of(m, 0, GiB + MiB, 2 * MiB, UADDR, KVM_MEM_LOG_DIRTY_PAGES) == 0
    assert m.slots()[0].flags == KVM_MEM_LOG_DIRTY_PAGES
    assert m.creates == 2


def test_readonly_slot_keeps_readonly() -> None:
    m = KvmModel()
    m.set_memory_region(0, 0, 4096, UADDR, KVM_MEM_READONLY)
    assert _errno_of(m, 0, 0, 4096, UADDR) == errno.EINVAL
    assert _errno_of(m, 0, 0, 4096, UADDR, KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES) == 0


def test_probe_mapped() -> None:
    m = KvmModel()
    m.set_memory_region(0, GiB, 4 * MiB, UADDR)
    assert m.probe_mapped(GiB)
    assert m.probe_mapped(GiB + 4 * MiB - 1)
    assert not m.probe_mapped(GiB + 4 * MiB)
    assert not m.probe_mapped(GiB - 1)
    # Probing leaves no trace.
    assert set(m.slots()) == {0}
    assert (m.creates, m.deletes) == (1, 0)


def test_probe_mapped_errors_like_the_kernel() -> None:
    m = KvmModel(max_memslots=8)
    with pytest.raises(KvmError) as info:
        m.probe_mapped(1 << 52)
    assert info.value.errno == errno.EINVAL
    m.set_memory_region(7, 0, 4096, UADDR)  # the scratch slot id
    with pytest.raises(KvmError, match="scratch slot 7") as info:
        m.probe_mapped(GiB)
    assert info.value.errno == errno.EINVAL


def test_probe_ignores_other_address_spaces() -> None:
    m = KvmModel(nr_address_spaces=2)
    m.set_memory_region(make_slot(1, 0), 0, 2 * MiB, UADDR)
    assert not m.probe_mapped(0)


def test_error_message_names_operation_slot_gpa_and_size() -> None:
    m = KvmModel()
    m.set_memory_region(0, GiB, 4 * MiB, UADDR)
    with pytest.raises(KvmError) as info:
        m.set_memory_region(5, GiB + 2 * MiB, 2 * MiB, UADDR)
    text = str(info.value)
    for part in ("set_memory_region", "memslot 5", "0x40200000", "2 MiB", "EEXIST", "memslot 0"):
        assert part in text


def test_metadata_bytes() -> None:
    m = KvmModel()
    m.set_memory_region(0, 0, GiB, UADDR)
    m.set_memory_region(1, 4 * GiB + 4096, 128 * MiB, UADDR, KVM_MEM_LOG_DIRTY_PAGES)
    expected = slot_metadata_bytes(0, GiB, m.mmu) + slot_metadata_bytes(
        4 * GiB + 4096, 128 * MiB, m.mmu, dirty_log=True
    )
    assert m.metadata_bytes() == expected
    # 644 pages for an aligned 1 GiB slot under shadow paging (kvm-memslot-cost.md A4).
    assert slot_metadata_bytes(0, GiB, m.mmu) == 644 * 4096
    m.delete_memory_region(0)
    m.set_memory_region(1, 4 * GiB + 4096, 128 * MiB, UADDR)  # dirty logging off again
    assert m.metadata_bytes() == slot_metadata_bytes(4 * GiB + 4096, 128 * MiB, m.mmu)


def test_metadata_depends_on_mmu() -> None:
    tdp = KvmModel(mmu=MmuConfig(shadow_paging=False, tdp_mmu=True))
    smm = KvmModel(mmu=MmuConfig(smm=True))
    for m in (tdp, smm):
        m.set_memory_region(0, 0, 4 * GiB, UADDR)
    assert tdp.metadata_bytes() == 3 * 4096
    assert smm.metadata_bytes() == 2 * 2572 * 4096


def test_closed_model_refuses_operations() -> None:
    with KvmModel() as m:
        m.set_memory_region(0, 0, 4096, UADDR)
    m.close()  # idempotent
    assert m.slots() == {}
    for op in (
        lambda: m.set_memory_region(0, 0, 4096, UADDR),
        lambda: m.delete_memory_region(0),
        lambda: m.probe_mapped(0),
    ):
        with pytest.raises(KvmError) as info:
            op()
        assert info.value.errno == errno.EBADF


def test_unrepresentable_fields_are_value_errors() -> None:
    m = KvmModel()
    with pytest.raises(ValueError, match="guest_phys_addr"):
        m.set_memory_region(0, -4096, 4096, UADDR)
    with pytest.raises(ValueError, match="slot"):
        m.set_memory_region(1 << 32, 0, 4096, UADDR)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        KvmModel(max_memslots=0)
    with pytest.raises(ValueError):
        KvmModel(max_memslots=40000)
    with pytest.raises(ValueError):
        KvmModel(nr_address_spaces=0)


def _uses_backend(vm: VmBackend) -> int:
    # Type-checks only if KvmModel satisfies the shared protocol.
    return vm.max_memslots


def test_model_satisfies_vm_backend() -> None:
    assert _uses_backend(KvmModel(max_memslots=5)) == 5


GRID = 2 * MiB
_ops = st.one_of(
    st.tuples(
        st.just("set"),
        st.integers(0, 3),
        st.integers(0, 7),
        st.sampled_from([0, 1, 2, 3]),
    ),
    st.tuples(st.just("delete"), st.integers(0, 3), st.just(0), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ops, max_size=30))
def test_invariants_hold_for_any_sequence(ops: list[tuple[str, int, int, int]]) -> None:
    m = KvmModel()
    for kind, slot, cell, pages in ops:
        try:
            if kind == "set":
                m.set_memory_region(slot, cell * GRID, pages * MiB, UADDR)
            else:
                m.delete_memory_region(slot)
        except KvmError as e:
            assert e.errno in (errno.EINVAL, errno.EEXIST)
    slots = sorted(m.slots().values(), key=lambda s: s.gpa)
    for a, b in itertools.pairwise(slots):
        assert a.end <= b.gpa, "slots of one address space never overlap"
    assert m.creates - m.deletes == len(slots)
    for cell in range(9):
        covered = any(s.gpa <= cell * GRID < s.end for s in slots)
        assert m.probe_mapped(cell * GRID) == covered
    assert m.metadata_bytes() == sum(slot_metadata_bytes(s.gpa, s.size, m.mmu) for s in slots)
