"""The VMM-side dirty tracker: writes through host memory that KVM's log never sees."""

from __future__ import annotations

import pytest

from memslots.errors import MigrationError
from memslots.host.memory import RamBackend
from memslots.memory.address_space import AddressSpace, GuestMemory, MemoryRegion
from memslots.migration.dirty import DirtyTracker, merge_runs
from memslots.sizes import MiB


def test_merge_runs() -> None:
    assert merge_runs([(5, 6), (0, 2), (2, 3), (7, 9), (8, 10)]) == [(0, 3), (5, 6), (7, 10)]
    assert merge_runs([]) == []


def test_writes_through_guest_memory_are_tracked_per_page() -> None:
    with RamBackend("ram", 16 * MiB) as ram, DirtyTracker() as tracker:
        space = AddressSpace("memory", MemoryRegion.container("system", 1 << 40))
        space.add_subregion(space.root, 1 << 30, MemoryRegion.ram("ram", ram))
        memory = GuestMemory(space)
        memory.write(1 << 30, b"x")  # before tracking: not seen
        tracker.track(ram)
        tracker.track(ram)  # idempotent
        memory.write((1 << 30) + 4095, b"ab")  # straddles pages 0 and 1
        memory.write((1 << 30) + 10 * 4096, bytes(3 * 4096))
        ram.write(MiB, b"direct")
        assert tracker.peek(ram) == [(0, 8192), (40960, 12288), (MiB, 4096)]
        assert tracker.dirty_bytes() == 8192 + 12288 + 4096
        assert tracker.take(ram) == [(0, 8192), (40960, 12288), (MiB, 4096)]
        assert tracker.take(ram) == []
        tracker.add_always_dirty(ram, 2 * MiB, 100)  # e.g. virtqueue rings, written via views
        ram.write(3 * MiB, b"y")
        assert tracker.take_all() == {ram: [(2 * MiB, 4096), (3 * MiB, 4096)]}
        assert tracker.take_all() == {ram: [(2 * MiB, 4096)]}
        tracker.untrack(ram)
        assert ram.write_hook is None and tracker.memories == []
        ram.write(0, b"z")
        assert tracker.take(ram) == []


def test_one_tracker_per_memory() -> None:
    with RamBackend("ram", 2 * MiB) as ram:
        first, second = DirtyTracker(), DirtyTracker()
        first.track(ram)
        with pytest.raises(MigrationError, match="already tracked"):
            second.track(ram)
        with pytest.raises(MigrationError, match="not tracked"):
            second.add_always_dirty(ram, 0, 1)
        first.close()
        second.track(ram)
        second.close()
        assert ram.write_hook is None
