"""Guest-physical address space: a tree of memory regions, flattened into sections.

Regions are RAM (a slice of a host memory backend), containers (hold subregions at offsets) or
aliases (a window into another region). The :class:`AddressSpace` owns the tree: every change
goes through it, inside a transaction, and at commit it flattens the tree into sorted,
non-overlapping :class:`Section` objects and tells each :class:`MemoryListener` (KVM, vhost, the
memory-device accounting) what was removed and what was added. Listeners therefore see each
batch of changes as a whole, removals first.

If a listener refuses a change (say KVM has no free memslot), the transaction's tree changes are
undone and every listener is brought back to the previous view, so the memory map never ends up
half-applied.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from memslots.errors import AddressSpaceError


class RamBlock(Protocol):
    """What the address space and its listeners need from host memory behind guest RAM.

    :class:`memslots.host.memory.HostMemory` (really mapped) and
    :class:`memslots.memory.backends.PlannedMemory` (described only, for planning) both provide it.
    """

    @property
    def id(self) -> str:
        """The backend's id."""
        ...

    @property
    def size(self) -> int:
        """Bytes of memory."""
        ...

    @property
    def page_size(self) -> int:
        """The backing page size (host page size, or the huge page size)."""
        ...

    @property
    def host_addr(self) -> int:
        """Host virtual address of the memory's first byte."""
        ...

    @property
    def fd(self) -> int | None:
        """File descriptor of fd-backed memory; None for anonymous memory."""
        ...

    @property
    def fd_offset(self) -> int:
        """Offset of the first byte within ``fd``."""
        ...

    @property
    def fd_backed(self) -> bool:
        """True if the memory can be shared with another process through an fd."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Give the host memory of a range back."""
        ...

    def populate(self, offset: int, length: int) -> None:
        """Preallocate the host memory of a range."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Copy bytes out of the memory."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Copy bytes into the memory."""
        ...

    def protect(self, offset: int, length: int) -> None:
        """Take a range out of everyone's reach through this mapping (PROT_NONE)."""
        ...

    def unprotect(self, offset: int, length: int) -> None:
        """Bring a protected range back into reach."""
        ...

    def check_access(self, offset: int, length: int) -> None:
        """Raise :class:`~memslots.errors.InaccessibleMemoryError` if any byte of the range
        is protected."""
        ...

    @property
    def access_generation(self) -> int:
        """Changes whenever a range is protected or unprotected (and when the memory goes)."""
        ...


class Section(NamedTuple):
    """A contiguous guest-physical range backed by one host memory backend.

    Sections compare by value (the backend by identity), so the same range of the same backend
    at the same address is the same section across flat views. A tuple, because every commit
    hashes and compares all of them.
    """

    gpa: int
    size: int
    backend: RamBlock
    offset: int
    name: str = ""

    @property
    def end(self) -> int:
        """First guest-physical address after the section."""
        return self.gpa + self.size

    @property
    def host_addr(self) -> int:
        """Host virtual address of the section's first byte."""
        return self.backend.host_addr + self.offset

    @property
    def fd(self) -> int | None:
        """File descriptor of the backing memory, or None for anonymous memory."""
        return self.backend.fd

    @property
    def fd_offset(self) -> int:
        """Offset of the section's first byte within ``fd``."""
        return self.backend.fd_offset + self.offset


class MemoryListener(Protocol):
    """Receives the changes of an address space's flat view, one transaction at a time."""

    def begin(self) -> None:
        """A batch of changes starts."""

    def region_del(self, section: Section) -> None:
        """``section`` is no longer mapped. Called before any region_add of the same batch."""

    def region_add(self, section: Section) -> None:
        """``section`` is now mapped. Must either succeed or raise without side effects."""

    def commit(self) -> None:
        """The batch is complete."""


class MemoryRegion:
    """A node of the region tree: RAM, container or alias (exactly one of these)."""

    name: str
    size: int

    def __init__(
        self,
        name: str,
        size: int,
        *,
        backend: RamBlock | None = None,
        backend_offset: int = 0,
        alias_of: MemoryRegion | None = None,
        alias_offset: int = 0,
        mergeable: bool = True,
        align: int = 0,
    ) -> None:
        if size <= 0:
            raise AddressSpaceError(f"memory region '{name}': size must be positive")
        if backend is not None and alias_of is not None:
            raise AddressSpaceError(f"memory region '{name}': RAM and alias at once")
        if backend is not None and backend_offset + size > backend.size:
            raise AddressSpaceError(
                f"memory region '{name}': [0x{backend_offset:x}, +0x{size:x}) exceeds "
                f"backend '{backend.id}' of size 0x{backend.size:x}"
            )
        if alias_of is not None and not alias_of.is_ram:
            raise AddressSpaceError(
                f"alias '{name}': aliases of containers are not supported, only of RAM"
            )
        if alias_of is not None and alias_offset + size > alias_of.size:
            raise AddressSpaceError(
                f"alias '{name}': [0x{alias_offset:x}, +0x{size:x}) exceeds "
                f"region '{alias_of.name}' of size 0x{alias_of.size:x}"
            )
        self.name = name
        self.size = size
        self.backend = backend
        self.backend_offset = backend_offset
        self.alias_of = alias_of
        self.alias_offset = alias_offset
        # Unmergeable regions stay separate sections even when contiguous: one memslot each.
        self.mergeable = mergeable
        self.align = align
        self.parent: MemoryRegion | None = None
        self.offset_in_parent = 0
        self._subregions: list[MemoryRegion] = []
        #: ``offset_in_parent`` of each subregion, kept sorted with them for bisecting.
        self._offsets: list[int] = []

    @classmethod
    def ram(cls, name: str, backend: RamBlock, *, align: int = 0) -> MemoryRegion:
        """A RAM region covering a whole backend."""
        return cls(name, backend.size, backend=backend, align=align)

    @classmethod
    def container(cls, name: str, size: int, *, align: int = 0) -> MemoryRegion:
        """An empty container; subregions are placed in it at offsets."""
        return cls(name, size, align=align)

    @classmethod
    def alias(
        cls, name: str, target: MemoryRegion, offset: int, size: int, *, mergeable: bool = True
    ) -> MemoryRegion:
        """A window ``[offset, offset+size)`` into ``target``."""
        return cls(name, size, alias_of=target, alias_offset=offset, mergeable=mergeable)

    @property
    def is_ram(self) -> bool:
        """True if the region (or what it aliases) is RAM."""
        if self.alias_of is not None:
            return self.alias_of.is_ram
        return self.backend is not None

    @property
    def is_container(self) -> bool:
        """True for a container region."""
        return self.backend is None and self.alias_of is None

    @property
    def subregions(self) -> tuple[MemoryRegion, ...]:
        """Subregions of a container, sorted by offset."""
        return tuple(self._subregions)

    @property
    def mapped(self) -> bool:
        """True while the region sits in a container."""
        return self.parent is not None

    def __repr__(self) -> str:
        return f"MemoryRegion({self.name!r}, size=0x{self.size:x})"

    def _flatten(self, base: int, out: list[_Piece]) -> None:
        if self.alias_of is not None:
            self.alias_of._flatten_window(base, self.alias_offset, self.size, self.mergeable, out)
        elif self.backend is not None:
            out.append(_Piece(base, self.size, self.backend, self.backend_offset, self.name, True))
        else:
            for sub in self._subregions:
                sub._flatten(base + sub.offset_in_parent, out)

    def _flatten_window(
        self, base: int, start: int, size: int, mergeable: bool, out: list[_Piece]
    ) -> None:
        """Flatten the part ``[start, start+size)`` of this region, placed at ``base``."""
        if self.alias_of is not None:
            self.alias_of._flatten_window(
                base, self.alias_offset + start, size, mergeable and self.mergeable, out
            )
        elif self.backend is not None:
            offset = self.backend_offset + start
            out.append(_Piece(base, size, self.backend, offset, self.name, mergeable))
        else:
            end = start + size
            subs = self._subregions
            # Subregions are sorted and do not overlap: skip straight to the first that ends
            # after ``start``.
            i = max(0, bisect_right(self._offsets, start) - 1)
            for sub in subs[i:]:
                if sub.offset_in_parent >= end:
                    break
                lo = max(start, sub.offset_in_parent)
                hi = min(end, sub.offset_in_parent + sub.size)
                if lo < hi:
                    sub._flatten_window(
                        base + lo - start, lo - sub.offset_in_parent, hi - lo, mergeable, out
                    )


class _Piece(NamedTuple):
    gpa: int
    size: int
    backend: RamBlock
    offset: int
    name: str
    mergeable: bool


def _coalesce(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort ranges and join the ones that overlap or touch."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(windows):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _merge(pieces: list[_Piece]) -> tuple[Section, ...]:
    """Merge neighbours that are both mergeable and contiguous in the same backend."""
    merged: list[_Piece] = []
    for p in pieces:
        if merged:
            q = merged[-1]
            if (
                p.mergeable
                and q.mergeable
                and q.backend is p.backend
                and q.gpa + q.size == p.gpa
                and q.offset + q.size == p.offset
            ):
                merged[-1] = q._replace(size=q.size + p.size)
                continue
        merged.append(p)
    return tuple(Section(p.gpa, p.size, p.backend, p.offset, p.name) for p in merged)


@dataclass
class _Change:
    add: bool
    parent: MemoryRegion
    offset: int
    region: MemoryRegion
    #: The guest-physical range the change touched, if the parent was reachable from the root.
    window: tuple[int, int] | None


class AddressSpace:
    """Owner of a region tree rooted at ``root``; the one place the memory map changes."""

    def __init__(self, name: str, root: MemoryRegion) -> None:
        if not root.is_container:
            raise AddressSpaceError(f"address space '{name}': root must be a container")
        self.name = name
        self.root = root
        self._listeners: list[MemoryListener] = []
        self._held: dict[int, set[Section]] = {}
        self._view: tuple[Section, ...] = ()
        #: ``gpa`` of each section of ``_view``, for bisecting (devices look up on every access).
        self._starts: list[int] = []
        #: The flat view before merging, and the ``gpa`` of each piece.
        self._pieces: list[_Piece] = []
        self._piece_starts: list[int] = []
        self._depth = 0
        self._log: list[_Change] = []

    # -- listeners ------------------------------------------------------------------------

    def register(self, listener: MemoryListener) -> None:
        """Add a listener and replay the current view to it (as one batch)."""
        self._listeners.append(listener)
        self._held[id(listener)] = set()
        try:
            self._deliver(listener, self._view)
        except Exception:
            self._listeners.remove(listener)
            del self._held[id(listener)]
            raise

    def unregister(self, listener: MemoryListener) -> None:
        """Remove a listener after telling it that every section it holds is gone."""
        self._deliver(listener, ())
        self._listeners.remove(listener)
        del self._held[id(listener)]

    # -- changes --------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group changes; listeners see them at the end of the outermost transaction."""
        self._depth += 1
        ok = False
        try:
            yield
            ok = True
        finally:
            self._depth -= 1
            if self._depth == 0:
                if ok:
                    self._commit()
                else:
                    self._undo()

    def add_subregion(self, parent: MemoryRegion, offset: int, region: MemoryRegion) -> None:
        """Place ``region`` in container ``parent`` at ``offset`` (no overlaps allowed)."""
        if not parent.is_container:
            raise AddressSpaceError(f"'{parent.name}' is not a container")
        if region.parent is not None:
            raise AddressSpaceError(
                f"region '{region.name}' is already mapped in '{region.parent.name}'"
            )
        if offset < 0 or offset + region.size > parent.size:
            raise AddressSpaceError(
                f"region '{region.name}' [0x{offset:x}, +0x{region.size:x}) does not fit "
                f"in '{parent.name}' of size 0x{parent.size:x}"
            )
        i = bisect_right(parent._offsets, offset)
        before = parent._subregions[i - 1] if i else None
        after = parent._subregions[i] if i < len(parent._subregions) else None
        for sib in (before, after):
            if sib is not None and (
                offset < sib.offset_in_parent + sib.size
                and sib.offset_in_parent < offset + region.size
            ):
                raise AddressSpaceError(
                    f"region '{region.name}' at 0x{offset:x} overlaps '{sib.name}' "
                    f"in '{parent.name}'"
                )
        with self.transaction():
            self._link(parent, offset, region)
            self._log.append(_Change(True, parent, offset, region, self._window(region)))

    def del_subregion(self, parent: MemoryRegion, region: MemoryRegion) -> None:
        """Remove ``region`` from container ``parent``."""
        if region.parent is not parent:
            raise AddressSpaceError(f"region '{region.name}' is not mapped in '{parent.name}'")
        with self.transaction():
            window = self._window(region)
            offset = region.offset_in_parent
            self._unlink(parent, region)
            self._log.append(_Change(False, parent, offset, region, window))

    def _window(self, region: MemoryRegion) -> tuple[int, int] | None:
        """Guest-physical range of a region placed in the tree, if the root reaches it."""
        addr = 0
        node: MemoryRegion | None = region
        while node is not None and node is not self.root:
            addr += node.offset_in_parent
            node = node.parent
        return (addr, addr + region.size) if node is self.root else None

    @staticmethod
    def _link(parent: MemoryRegion, offset: int, region: MemoryRegion) -> None:
        region.parent = parent
        region.offset_in_parent = offset
        i = bisect_right(parent._offsets, offset)
        parent._offsets.insert(i, offset)
        parent._subregions.insert(i, region)

    @staticmethod
    def _unlink(parent: MemoryRegion, region: MemoryRegion) -> None:
        i = parent._subregions.index(region)
        del parent._subregions[i]
        del parent._offsets[i]
        region.parent = None

    # -- views ----------------------------------------------------------------------------

    @property
    def sections(self) -> tuple[Section, ...]:
        """The committed flat view: sorted, non-overlapping sections."""
        return self._view

    def find(self, gpa: int) -> Section | None:
        """The section containing ``gpa``, if any."""
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            s = self._view[i]
            if gpa < s.gpa + s.size:
                return s
        return None

    def absolute_address(self, region: MemoryRegion) -> int:
        """Guest-physical address of a region mapped (directly or nested) in this space."""
        addr = 0
        node: MemoryRegion | None = region
        while node is not None and node is not self.root:
            if node.parent is None:
                raise AddressSpaceError(f"region '{region.name}' is not mapped in '{self.name}'")
            addr += node.offset_in_parent
            node = node.parent
        return addr

    def flatten(self) -> tuple[Section, ...]:
        """Flatten the current (possibly uncommitted) tree."""
        return _merge(self._flatten_pieces())

    def _flatten_pieces(self) -> list[_Piece]:
        out: list[_Piece] = []
        self.root._flatten(0, out)
        return out

    # -- commit machinery -----------------------------------------------------------------

    def _commit(self) -> None:
        log, self._log = self._log, []
        windows = _coalesce([c.window for c in log if c.window is not None])
        if not windows:
            return  # nothing reachable from the root changed
        pieces, view, dels, adds = self._next_view(windows)
        if not dels and not adds:
            return
        try:
            for listener in self._listeners:
                self._apply(listener, dels, adds)
        except Exception:
            self._revert_tree(log)
            old = self._view
            for listener in self._listeners:
                # Bring every listener back to the old view; if that fails too there is no
                # consistent state left to offer, so say so loudly.
                try:
                    self._deliver(listener, old)
                except Exception as exc2:
                    raise AddressSpaceError(
                        f"address space '{self.name}': rollback failed for a listener: {exc2}"
                    ) from exc2
            raise
        self._pieces = pieces
        self._piece_starts = [p.gpa for p in pieces]
        self._set_view(view)

    def _next_view(
        self, windows: list[tuple[int, int]]
    ) -> tuple[list[_Piece], tuple[Section, ...], list[Section], list[Section]]:
        """Re-flatten only the changed windows: new pieces, new view, removals, additions.

        Regions never overlap and aliases only point at RAM, so the pieces inside a window
        are exactly what the changes there produce. Unmergeable pieces map 1:1 to sections,
        so when only those changed the view is spliced; otherwise it is merged again.
        """
        old_pieces, starts = self._pieces, self._piece_starts
        pieces: list[_Piece] = []
        removed: list[_Piece] = []
        inserted: list[_Piece] = []
        i = 0
        for lo, hi in windows:
            j = bisect_left(starts, lo, i)
            k = bisect_left(starts, hi, j)
            pieces += old_pieces[i:j]
            removed += old_pieces[j:k]
            fresh: list[_Piece] = []
            self.root._flatten_window(lo, lo, hi - lo, True, fresh)
            pieces += fresh
            inserted += fresh
            i = k
        pieces += old_pieces[i:]
        if any(p.mergeable for p in removed) or any(p.mergeable for p in inserted):
            view = _merge(pieces)
            old_set, new_set = set(self._view), set(view)
            dels = sorted(old_set - new_set, key=lambda s: s.gpa, reverse=True)
            adds = [s for s in view if s not in old_set]
            return pieces, view, dels, adds
        gone = [Section(p.gpa, p.size, p.backend, p.offset, p.name) for p in removed]
        new = [Section(p.gpa, p.size, p.backend, p.offset, p.name) for p in inserted]
        gone_set, new_set = set(gone), set(new)
        dels = [s for s in reversed(gone) if s not in new_set]
        adds = [s for s in new if s not in gone_set]
        view_list, view_starts = list(self._view), list(self._starts)
        for s in dels:
            at = bisect_left(view_starts, s.gpa)
            del view_list[at], view_starts[at]
        for s in adds:
            at = bisect_left(view_starts, s.gpa)
            view_list.insert(at, s)
            view_starts.insert(at, s.gpa)
        return pieces, tuple(view_list), dels, adds

    def _set_view(self, view: tuple[Section, ...]) -> None:
        self._view = view
        self._starts = [s.gpa for s in view]

    def _undo(self) -> None:
        log, self._log = self._log, []
        self._revert_tree(log)

    def _revert_tree(self, log: list[_Change]) -> None:
        for change in reversed(log):
            if change.add:
                self._unlink(change.parent, change.region)
            else:
                self._link(change.parent, change.offset, change.region)

    def _deliver(self, listener: MemoryListener, target: tuple[Section, ...]) -> None:
        """Bring ``listener`` from what it holds to ``target``."""
        held = self._held[id(listener)]
        wanted = set(target)
        dels = sorted(held - wanted, key=lambda s: s.gpa, reverse=True)
        adds = [s for s in target if s not in held]
        self._apply(listener, dels, adds)

    def _apply(self, listener: MemoryListener, dels: list[Section], adds: list[Section]) -> None:
        if not dels and not adds:
            return
        held = self._held[id(listener)]
        listener.begin()
        try:
            for s in dels:
                listener.region_del(s)
                held.discard(s)
            for s in adds:
                listener.region_add(s)
                held.add(s)
        finally:
            listener.commit()


class GuestMemory:
    """Reads and writes guest-physical memory through an address space's committed view.

    Only mapped RAM is reachable: an access that touches a gap (an unmapped memslot, MMIO)
    raises :class:`AddressSpaceError`, just as a device's DMA would fail there; one that
    touches protected memory inside a mapped memslot (a virtio-mem device's unplugged block)
    raises :class:`~memslots.errors.InaccessibleMemoryError`, which is one too.
    """

    def __init__(self, address_space: AddressSpace) -> None:
        self.address_space = address_space

    def ranges(self, gpa: int, length: int) -> list[tuple[Section, int, int]]:
        """The RAM behind ``[gpa, gpa+length)``: ``(section, backend offset, bytes)`` in order.

        This is what a device maps for DMA (QEMU's ``address_space_map``); raises
        :class:`AddressSpaceError` if any byte is not mapped RAM or is out of reach.
        """
        # Fast path for the common access inside one section: no generator, one bisect.
        section = self.address_space.find(gpa)
        if section is not None and 0 < length <= section.gpa + section.size - gpa:
            offset = section.offset + gpa - section.gpa
            section.backend.check_access(offset, length)
            return [(section, offset, length)]
        pieces = list(self._pieces(gpa, length))
        for section, offset, n in pieces:
            section.backend.check_access(offset, n)
        return pieces

    def _pieces(self, gpa: int, length: int) -> Iterator[tuple[Section, int, int]]:
        if gpa < 0 or length < 0:
            raise AddressSpaceError(f"invalid guest memory access [0x{gpa:x}, +0x{length:x})")
        pos, end = gpa, gpa + length
        while pos < end:
            section = self.address_space.find(pos)
            if section is None:
                raise AddressSpaceError(
                    f"guest-physical address 0x{pos:x} is not RAM in '{self.address_space.name}'"
                )
            n = min(end, section.end) - pos
            yield section, section.offset + pos - section.gpa, n
            pos += n

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        """True if every byte of ``[gpa, gpa+length)`` is mapped RAM within reach."""
        try:
            self.ranges(gpa, length)
        except AddressSpaceError:
            return False
        return True

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes of guest memory starting at ``gpa``."""
        section = self.address_space.find(gpa)
        if section is not None and 0 < length <= section.gpa + section.size - gpa:
            return section.backend.read(section.offset + gpa - section.gpa, length)
        parts = [section.backend.read(offset, n) for section, offset, n in self.ranges(gpa, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest memory at ``gpa`` (all of it is checked before a byte is
        copied)."""
        section = self.address_space.find(gpa)
        if section is not None and 0 < len(data) <= section.gpa + section.size - gpa:
            # One section: its backend checks the whole range before it copies.
            section.backend.write(section.offset + gpa - section.gpa, data)
            return
        done = 0
        for section, offset, n in self.ranges(gpa, len(data)):
            section.backend.write(offset, data[done : done + n])
            done += n
