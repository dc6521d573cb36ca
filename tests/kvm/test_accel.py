"""KVM as a memslot consumer: slot ids, refusals, and metadata prediction."""

from __future__ import annotations

import pytest

from memslots.errors import KvmError
from memslots.kvm.accel import KvmAccel
from memslots.kvm.mmu import MmuConfig
from memslots.kvm.model import KvmModel
from memslots.memory.address_space import Section
from memslots.memory.backends import PlannedMemory
from memslots.options import parse_backend
from memslots.sizes import GiB


def sections(n: int) -> list[Section]:
    mem = PlannedMemory(parse_backend(f"memory-backend-ram,id=r,size={n}G"))
    return [Section(i * GiB, GiB, mem, i * GiB, f"s{i}") for i in range(n)]


def test_lowest_free_slot_id_is_reused() -> None:
    model = KvmModel(max_memslots=8, mmu=MmuConfig())
    kvm = KvmAccel(model)
    s = sections(4)
    for sec in s[:3]:
        kvm.region_add(sec)
    assert [k.slot for k in kvm.slots()] == [0, 1, 2]
    kvm.region_del(s[1])
    kvm.region_add(s[3])
    assert kvm.slot_of(s[3]) == 1
    assert sorted(model.slots()) == [0, 1, 2]
    assert (kvm.creates, kvm.deletes, kvm.used_memslots) == (4, 1, 3)


def test_full_kvm_refuses_without_side_effects() -> None:
    kvm = KvmAccel(KvmModel(max_memslots=3, mmu=MmuConfig()), other_used=1)
    s = sections(3)
    kvm.region_add(s[0])
    kvm.region_add(s[1])
    with pytest.raises(KvmError, match="all 3 memslots are in use") as info:
        kvm.region_add(s[2])
    assert info.value.errno == 28 and kvm.used_memslots == 3 and kvm.free_memslots == 0


def test_kernel_error_returns_the_slot_id() -> None:
    model = KvmModel(max_memslots=8, mmu=MmuConfig())
    kvm = KvmAccel(model)
    s = sections(2)
    kvm.region_add(s[0])
    clash = Section(0, GiB, s[1].backend, GiB, "clash")  # overlaps s[0] in guest space
    with pytest.raises(KvmError):
        kvm.region_add(clash)
    kvm.region_add(s[1])
    assert kvm.slot_of(s[1]) == 1 and kvm.used_memslots == 2


def test_predicted_metadata() -> None:
    kvm = KvmAccel(KvmModel(mmu=MmuConfig()))
    for sec in sections(2):
        kvm.region_add(sec)
    # 644 pages per 1 GiB (docs/reference/kvm-memslot-cost.md A4)
    assert kvm.predicted_metadata_bytes() == 2 * 644 * 4096
    assert kvm.predicted_metadata_bytes(lambda s: s.gpa == 0) == 644 * 4096
