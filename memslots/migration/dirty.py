"""What the VMM itself writes into guest memory: the dirty pages KVM's log never sees.

KVM logs stores a vCPU makes through its page tables. The VMM also writes guest RAM through
its own host mapping -- the guest model's pattern records (``GuestMemory.write``), the probe
vCPU's command lists, a device's answers -- and those writes bypass KVM entirely, so a
migration must learn of them another way. :class:`DirtyTracker` hooks
:attr:`memslots.host.memory.HostMemory.write_hook` of the memory it tracks, so every
``write()`` reports its range; writers that go through raw memoryviews instead (the
virtqueue rings) register their few fixed ranges with :meth:`DirtyTracker.add_always_dirty`,
which every :meth:`DirtyTracker.take` reports again.
"""

from __future__ import annotations

from memslots.closing import Closing
from memslots.errors import MigrationError
from memslots.host.memory import HostMemory

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged ``(first, end)`` half-open runs (overlapping or touching ones join)."""
    out: list[tuple[int, int]] = []
    for first, end in sorted(runs):
        if out and first <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((first, end))
    return out


class DirtyTracker(Closing):
    """Dirty 4 KiB pages per tracked :class:`HostMemory`, from the VMM's own writes.

    A memory can be tracked by one tracker at a time (its single hook). Ranges are kept as
    page runs and merged when taken, so a large write costs one entry, not one per page.
    """

    def __init__(self) -> None:
        self._runs: dict[HostMemory, list[tuple[int, int]]] = {}
        self._always: dict[HostMemory, list[tuple[int, int]]] = {}

    @property
    def memories(self) -> list[HostMemory]:
        """The memories being tracked."""
        return list(self._runs)

    def track(self, memory: HostMemory) -> None:
        """Start recording the writes into ``memory``."""
        if memory in self._runs:
            return
        if memory.write_hook is not None:
            raise MigrationError(f"memory backend '{memory.id}' is already tracked elsewhere")

        def hook(offset: int, length: int) -> None:
            self.mark(memory, offset, length)

        memory.write_hook = hook
        self._runs[memory] = []

    def untrack(self, memory: HostMemory) -> None:
        """Stop recording ``memory`` and forget its dirty pages."""
        if self._runs.pop(memory, None) is not None:
            memory.write_hook = None
        self._always.pop(memory, None)

    def mark(self, memory: HostMemory, offset: int, length: int) -> None:
        """Record that ``[offset, offset + length)`` of ``memory`` was written (ignored for
        memory that is not tracked)."""
        runs = self._runs.get(memory)
        if runs is None or length <= 0:
            return
        runs.append((offset >> PAGE_SHIFT, (offset + length - 1 >> PAGE_SHIFT) + 1))

    def add_always_dirty(self, memory: HostMemory, offset: int, length: int) -> None:
        """Report ``[offset, offset + length)`` of ``memory`` as dirty on every :meth:`take`
        (for memory the VMM writes without going through ``write()``)."""
        if memory not in self._runs:
            raise MigrationError(f"memory backend '{memory.id}' is not tracked")
        if length > 0:
            first, end = offset >> PAGE_SHIFT, (offset + length - 1 >> PAGE_SHIFT) + 1
            self._always.setdefault(memory, []).append((first, end))

    def peek(self, memory: HostMemory) -> list[tuple[int, int]]:
        """The dirty ranges of ``memory`` as ``(offset, length)`` in bytes, page aligned,
        sorted and merged, without clearing them."""
        runs = self._runs.get(memory, []) + self._always.get(memory, [])
        return [(f << PAGE_SHIFT, (e - f) << PAGE_SHIFT) for f, e in merge_runs(runs)]

    def take(self, memory: HostMemory) -> list[tuple[int, int]]:
        """Like :meth:`peek`, and start afresh (the always-dirty ranges stay)."""
        out = self.peek(memory)
        if memory in self._runs:
            self._runs[memory] = []
        return out

    def take_all(self) -> dict[HostMemory, list[tuple[int, int]]]:
        """:meth:`take` of every tracked memory that has dirty pages."""
        out = {}
        for memory in list(self._runs):
            ranges = self.take(memory)
            if ranges:
                out[memory] = ranges
        return out

    def dirty_bytes(self) -> int:
        """Bytes currently dirty over all tracked memory."""
        return sum(length for m in self._runs for _, length in self.peek(m))

    def close(self) -> None:
        """Untrack everything (the hooks are removed)."""
        for memory in list(self._runs):
            self.untrack(memory)
