"""Region tree, flattening, and transactional delivery to listeners."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memslots.errors import AddressSpaceError, KvmError
from memslots.memory.address_space import AddressSpace, MemoryRegion, Section
from memslots.memory.backends import PlannedMemory
from memslots.options import parse_backend
from memslots.sizes import GiB, MiB


def mem(name: str, size: str) -> PlannedMemory:
    return PlannedMemory(parse_backend(f"memory-backend-ram,id={name},size={size}"))


class Recorder:
    """A listener that records its calls and can refuse one add."""

    def __init__(self, refuse_gpa: int | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.held: set[Section] = set()
        self.refuse_gpa = refuse_gpa

    def begin(self) -> None:
        self.calls.append(("begin", 0, 0))

    def commit(self) -> None:
        self.calls.append(("commit", 0, 0))

    def region_add(self, s: Section) -> None:
        if s.gpa == self.refuse_gpa:
            raise KvmError("refused", 28)
        self.held.add(s)
        self.calls.append(("add", s.gpa, s.size))

    def region_del(self, s: Section) -> None:
        self.held.remove(s)
        self.calls.append(("del", s.gpa, s.size))


def space() -> AddressSpace:
    return AddressSpace("test", MemoryRegion.container("system", 1 << 44))


def test_alias_windows_flatten_to_backend_offsets() -> None:
    a = space()
    ram = MemoryRegion.ram("ram", mem("r", "4G"))
    a.add_subregion(a.root, 0, MemoryRegion.alias("low", ram, 0, 3 * GiB))
    a.add_subregion(a.root, 4 * GiB, MemoryRegion.alias("high", ram, 3 * GiB, GiB))
    secs = a.sections
    assert [(s.gpa, s.size, s.offset) for s in secs] == [(0, 3 * GiB, 0), (4 * GiB, GiB, 3 * GiB)]
    assert a.find(4 * GiB + 5) == secs[1] and a.find(3 * GiB) is None


def test_container_nesting_and_merging() -> None:
    a = space()
    backing = mem("b", "2G")
    ram = MemoryRegion.ram("ram", backing)
    box = MemoryRegion.container("box", 2 * GiB)
    a.add_subregion(a.root, 8 * GiB, box)
    with a.transaction():
        a.add_subregion(box, 0, MemoryRegion.alias("m0", ram, 0, GiB))
        a.add_subregion(box, GiB, MemoryRegion.alias("m1", ram, GiB, GiB))
    # mergeable neighbours of the same backend become one section
    assert [(s.gpa, s.size) for s in a.sections] == [(8 * GiB, 2 * GiB)]
    b = space()
    box2 = MemoryRegion.container("box", 2 * GiB)
    b.add_subregion(b.root, 0, box2)
    b.add_subregion(box2, 0, MemoryRegion.alias("m0", ram, 0, GiB, mergeable=False))
    b.add_subregion(box2, GiB, MemoryRegion.alias("m1", ram, GiB, GiB, mergeable=False))
    assert [(s.gpa, s.size) for s in b.sections] == [(0, GiB), (GiB, GiB)]
    assert b.absolute_address(box2.subregions[1]) == GiB


def test_transaction_batches_removals_first() -> None:
    a = space()
    ram = MemoryRegion.ram("ram", mem("r", "2G"))
    s0 = MemoryRegion.alias("s0", ram, 0, GiB, mergeable=False)
    s1 = MemoryRegion.alias("s1", ram, GiB, GiB, mergeable=False)
    a.add_subregion(a.root, 0, s0)
    rec = Recorder()
    a.register(rec)
    assert rec.calls == [("begin", 0, 0), ("add", 0, GiB), ("commit", 0, 0)]
    rec.calls.clear()
    with a.transaction():
        a.add_subregion(a.root, 2 * GiB, s1)
        a.del_subregion(a.root, s0)
        assert rec.calls == []  # nothing is seen before the commit
    assert rec.calls == [("begin", 0, 0), ("del", 0, GiB), ("add", 2 * GiB, GiB), ("commit", 0, 0)]


def test_refused_add_rolls_back_everything() -> None:
    a = space()
    ram = MemoryRegion.ram("ram", mem("r", "3G"))
    pieces = [MemoryRegion.alias(f"s{i}", ram, i * GiB, GiB, mergeable=False) for i in range(3)]
    ok, refusing = Recorder(), Recorder(refuse_gpa=2 * GiB)
    a.register(ok)
    a.register(refusing)
    a.add_subregion(a.root, 0, pieces[0])
    before = a.sections
    with pytest.raises(KvmError), a.transaction():
        a.add_subregion(a.root, GiB, pieces[1])
        a.add_subregion(a.root, 2 * GiB, pieces[2])
    assert a.sections == before
    assert ok.held == set(before) and refusing.held == set(before)
    assert not pieces[1].mapped and not pieces[2].mapped


def test_exception_inside_transaction_undoes_tree() -> None:
    a = space()
    r = MemoryRegion.ram("ram", mem("r", "1G"))
    with pytest.raises(RuntimeError), a.transaction():
        a.add_subregion(a.root, 0, r)
        raise RuntimeError("boom")
    assert not r.mapped and a.sections == ()


@pytest.mark.parametrize(
    "offset,size,match",
    [(GiB // 2, GiB, "overlaps"), ((1 << 44) - MiB, GiB, "does not fit"), (-4096, MiB, "fit")],
)
def test_bad_placements(offset: int, size: int, match: str) -> None:
    a = space()
    a.add_subregion(a.root, 0, MemoryRegion.ram("ram", mem("r", "1G")))
    with pytest.raises(AddressSpaceError, match=match):
        a.add_subregion(
            a.root,
            offset,
            MemoryRegion.ram(
                "x", PlannedMemory(parse_backend(f"memory-backend-ram,id=x,size={size}"))
            ),
        )


def test_region_validation() -> None:
    ram = MemoryRegion.ram("ram", mem("r", "1G"))
    with pytest.raises(AddressSpaceError, match="exceeds region 'ram'"):
        MemoryRegion.alias("a", ram, GiB // 2, GiB)
    a = space()
    a.add_subregion(a.root, 0, ram)
    with pytest.raises(AddressSpaceError, match="already mapped"):
        a.add_subregion(a.root, 2 * GiB, ram)
    with pytest.raises(AddressSpaceError, match="not a container"):
        a.add_subregion(ram, 0, MemoryRegion.ram("x", mem("x", "4K")))


def test_aliases_of_containers_are_refused() -> None:
    with pytest.raises(AddressSpaceError, match="aliases of containers are not supported"):
        MemoryRegion.alias("a", MemoryRegion.container("c", GiB), 0, GiB)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.booleans()), max_size=60))
def test_incremental_view_equals_a_full_flatten(ops: list[tuple[bool, int, bool]]) -> None:
    """Whatever is added and removed (mergeable or not, in a container that is itself mapped
    or not, in one transaction), the committed view equals a fresh flatten and every
    listener holds exactly it."""
    a = space()
    ram = MemoryRegion.ram("ram", mem("r", "16G"))
    box = MemoryRegion.container("box", 16 * GiB)
    slots = [
        MemoryRegion.alias(f"s{i}", ram, i * GiB, GiB, mergeable=i % 3 != 0) for i in range(16)
    ]
    rec = Recorder()
    a.register(rec)
    for add, i, toggle_box in ops:
        with a.transaction():
            if toggle_box:
                if box.mapped:
                    a.del_subregion(a.root, box)
                else:
                    a.add_subregion(a.root, 32 * GiB, box)
            if add and not slots[i].mapped:
                a.add_subregion(box, i * GiB, slots[i])
            elif not add and slots[i].mapped:
                a.del_subregion(box, slots[i])
        assert a.sections == a.flatten()
        assert rec.held == set(a.sections)
        assert all(a.find(s.gpa) == s for s in a.sections)
