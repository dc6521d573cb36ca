"""KVM as a memslot consumer: one KVM memslot per RAM section of the system address space.

:class:`KvmAccel` owns the slot numbers (lowest free id first, freed ids reused, as
Cloud Hypervisor's and crosvm's allocators do) and drives a VM backend, which is either the real
kernel (:class:`memslots.kvm.vm.KvmVm`) or the model (:class:`memslots.kvm.model.KvmModel`). It
also predicts what the kernel spends on metadata for the slots it holds, and what each memslot
delete costs the guest (:func:`memslots.kvm.cost.unmap_cost`).

Dirty logging (for live migration) is switched on and off for the accelerator's own slots only
(:meth:`KvmAccel.start_dirty_log`): with dynamic memslots the kernel's bitmaps then cover what
is mapped, not the whole device. :meth:`KvmAccel.sync_dirty_log` hands back one
:class:`DirtySlot` per slot, its bitmap already cleared in the kernel, so pages must be read
(and sent) only after the sync.
"""

from __future__ import annotations

import errno
import heapq
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from memslots.errors import KvmError
from memslots.kvm.abi import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SHIFT, VmBackend
from memslots.kvm.cost import (
    DEFAULT_WORKING_SET_FRAMES,
    UnmapCost,
    slot_memcg_bytes,
    slot_metadata_bytes,
    unmap_cost,
)
from memslots.kvm.dirty import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    bitmap_any,
    bitmap_count,
    bitmap_runs,
    full_bitmap,
)
from memslots.memory.address_space import Section
from memslots.memory.consumer import MemslotConsumer

log = logging.getLogger("memslots.kvm.accel")


@dataclass(frozen=True)
class DirtySlot:
    """The pages of one memslot written since the previous sync, and where they live.

    ``bitmap`` has one bit per 4 KiB page of ``section`` (KVM's layout, see
    :mod:`memslots.kvm.dirty`); ``section`` maps it to guest-physical addresses and to offsets
    in its host memory backend.
    """

    slot: int
    section: Section
    bitmap: bytes

    @property
    def npages(self) -> int:
        """Pages in the slot."""
        return self.section.size >> PAGE_SHIFT

    @property
    def dirty_pages(self) -> int:
        """How many pages are dirty."""
        return bitmap_count(self.bitmap)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Dirty runs as ``(first page, pages)`` within the slot."""
        return bitmap_runs(self.bitmap, self.npages)

    def gpa_ranges(self) -> Iterator[tuple[int, int]]:
        """Dirty runs as guest-physical ``(address, bytes)``."""
        for first, count in self.runs():
            yield self.section.gpa + (first << PAGE_SHIFT), count << PAGE_SHIFT

    def backend_ranges(self) -> Iterator[tuple[int, int]]:
        """Dirty runs as ``(offset, bytes)`` in ``section.backend`` (what a migration sends)."""
        for first, count in self.runs():
            yield self.section.offset + (first << PAGE_SHIFT), count << PAGE_SHIFT


@dataclass(frozen=True)
class KvmSlot:
    """One KVM memslot we created: its id and the section it maps."""

    slot: int
    section: Section


class KvmAccel(MemslotConsumer):
    """Maps sections into a VM as memslots; ``other_used`` models slots owned by others.

    QEMU's boot also spends slots on ROMs and BIOS; ``other_used`` lets a planner describe
    such a host ("N memslots free when the first memory device is plugged").

    ``kernel_seconds`` is the time spent in memslot ioctls, ``delete_seconds`` the part of it
    spent deleting and ``delete_cpu_seconds`` the CPU time of those deletes (which, unlike
    wall-clock time, does not grow while other processes keep the host's CPUs busy).
    ``unmap_cost_ms`` adds up what the model predicts the deletes cost the guest (delete plus
    re-fault, :func:`~memslots.kvm.cost.unmap_cost`) for a guest that keeps using
    ``working_set_frames`` frames and the VM's SLOT_ZAP_ALL setting.

    Like QEMU at ``kvm_init``, it enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (with
    INITIALLY_SET where the kernel has it) before any memslot exists, unless
    ``manual_dirty_log`` is False; ``dirty_log_protect`` says what was enabled.
    """

    name = "kvm"

    def __init__(
        self, vm: VmBackend, *, other_used: int = 0, manual_dirty_log: bool = True
    ) -> None:
        self.vm = vm
        self.other_used = other_used
        self._slots: dict[Section, int] = {}
        self._free_ids: list[int] = []
        self._next_id = 0
        self.creates = 0
        self.deletes = 0
        self.kernel_seconds = 0.0
        self.delete_seconds = 0.0
        self.delete_cpu_seconds = 0.0
        self.working_set_frames = DEFAULT_WORKING_SET_FRAMES
        self.unmap_cost_ms = 0.0
        #: The KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 options enabled on the VM (0: none).
        self.dirty_log_protect = 0
        #: True between start_dirty_log() and stop_dirty_log().
        self.dirty_logging = False
        # Slots whose next sync reports every page (new to the log), and the last bitmaps of
        # slots deleted while logging.
        self._dirty_all: set[int] = set()
        self._dirty_pending: list[DirtySlot] = []
        self._dirty_which: Callable[[Section], bool] | None = None
        if manual_dirty_log:
            self._enable_manual_dirty_log()

    @property
    def is_real(self) -> bool:
        """True when the slots live in the real kernel."""
        return self.vm.is_real

    @property
    def max_memslots(self) -> int:
        return self.vm.max_memslots

    @property
    def used_memslots(self) -> int:
        return len(self._slots) + self.other_used

    def slots(self) -> list[KvmSlot]:
        """Our memslots, sorted by guest-physical address."""
        items = sorted(self._slots.items(), key=lambda kv: kv[0].gpa)
        return [KvmSlot(slot, section) for section, slot in items]

    def slot_of(self, section: Section) -> int | None:
        """The slot id mapping ``section``, if any."""
        return self._slots.get(section)

    def region_add(self, section: Section) -> None:
        if self.used_memslots >= self.max_memslots:
            raise KvmError(
                f"kvm: no free memslot for '{section.name}' at 0x{section.gpa:x}: "
                f"all {self.max_memslots} memslots are in use",
                errno.ENOSPC,
            )
        reused = bool(self._free_ids)
        slot = heapq.heappop(self._free_ids) if reused else self._next_id
        logged = self._logged(section)
        flags = KVM_MEM_LOG_DIRTY_PAGES if logged else 0
        t0 = time.perf_counter()
        try:
            self.vm.set_memory_region(slot, section.gpa, section.size, section.host_addr, flags)
        except KvmError:
            if reused:
                heapq.heappush(self._free_ids, slot)
            raise
        finally:
            self.kernel_seconds += time.perf_counter() - t0
        if not reused:
            self._next_id += 1
        self._slots[section] = slot
        self.creates += 1
        if logged:
            self._dirty_all.add(slot)

    def region_del(self, section: Section) -> None:
        slot = self._slots[section]
        if self._logged(section):
            # As QEMU does: keep what the slot logged, its bitmap dies with it.
            try:
                self._dirty_pending.append(self._take_dirty(slot, section))
            except KvmError as exc:
                log.warning("kvm: cannot read the dirty log of slot %d: %s", slot, exc)
                full = full_bitmap(section.size >> PAGE_SHIFT)
                self._dirty_pending.append(DirtySlot(slot, section, bytes(full)))
            self._dirty_all.discard(slot)
        del self._slots[section]
        t0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            self.vm.delete_memory_region(slot)
        finally:
            elapsed = time.perf_counter() - t0
            self.kernel_seconds += elapsed
            self.delete_seconds += elapsed
            self.delete_cpu_seconds += time.thread_time() - cpu0
        heapq.heappush(self._free_ids, slot)
        self.deletes += 1
        self.unmap_cost_ms += self.predicted_unmap_cost(section.size).total_ms

    def predicted_unmap_cost(self, size: int) -> UnmapCost:
        """What deleting a memslot of ``size`` bytes costs the guest (kvm.cost.unmap_cost)."""
        return unmap_cost(
            size, slot_zap_all=self.vm.slot_zap_all, working_set_frames=self.working_set_frames
        )

    def predicted_metadata_bytes(self, which: Callable[[Section], bool] | None = None) -> int:
        """Kernel vmalloc bytes our memslots (or those ``which`` selects) cost (kvm.cost), dirty
        bitmaps included while logging."""
        return sum(
            slot_metadata_bytes(s.gpa, s.size, self.vm.mmu, self._logged(s))
            for s in self._slots
            if which is None or which(s)
        )

    def predicted_memcg_bytes(self, which: Callable[[Section], bool] | None = None) -> int:
        """Bytes our memslots (or those ``which`` selects) charge to our memory cgroup.

        The per-VM counterpart of :meth:`predicted_metadata_bytes`
        (:func:`~memslots.kvm.cost.slot_memcg_bytes`).
        """
        return sum(
            slot_memcg_bytes(s.gpa, s.size, self.vm.mmu, self._logged(s))
            for s in self._slots
            if which is None or which(s)
        )

    def predicted_kernel_bytes(
        self, source: str, which: Callable[[Section], bool] | None = None
    ) -> int:
        """The model's figure to compare with a measurement from ``source``.

        ``"cgroup"`` (a per-VM memory cgroup): :meth:`predicted_memcg_bytes`; ``"system"``
        (VmallocUsed): :meth:`predicted_metadata_bytes`.
        """
        if source == "cgroup":
            return self.predicted_memcg_bytes(which)
        return self.predicted_metadata_bytes(which)

    def predicted_dirty_log_bytes(self) -> int:
        """Kernel vmalloc bytes the dirty bitmaps of our memslots cost (or would, if logging
        were on): two copies of ``ALIGN(pages, 64) / 8`` bytes per slot, in whole pages."""
        mmu = self.vm.mmu
        return sum(
            slot_metadata_bytes(s.gpa, s.size, mmu, True) - slot_metadata_bytes(s.gpa, s.size, mmu)
            for s in self._slots
        )

    # -- dirty logging ---------------------------------------------------------------------------

    def _enable_manual_dirty_log(self) -> None:
        try:
            caps = self.vm.dirty_log_caps()
            if not caps & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                return
            initially_set = bool(caps & KVM_DIRTY_LOG_INITIALLY_SET)
            self.vm.enable_dirty_log_protect(initially_set)
        except KvmError as exc:
            log.warning("kvm: manual dirty-log protection unavailable: %s", exc)
            return
        self.dirty_log_protect = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | (
            KVM_DIRTY_LOG_INITIALLY_SET if initially_set else 0
        )

    def _set_logging(self, slot: int, section: Section, on: bool) -> None:
        flags = KVM_MEM_LOG_DIRTY_PAGES if on else 0
        t0 = time.perf_counter()
        try:
            self.vm.set_memory_region(slot, section.gpa, section.size, section.host_addr, flags)
        finally:
            self.kernel_seconds += time.perf_counter() - t0

    def start_dirty_log(self, which: Callable[[Section], bool] | None = None) -> None:
        """Turn KVM_MEM_LOG_DIRTY_PAGES on for every memslot we hold (FLAGS_ONLY changes);
        slots created from now on get it too. The next :meth:`sync_dirty_log` reports every
        page of every slot (KVM's INITIALLY_SET, or synthesised where the kernel lacks it), so
        a migration's first pass is simply "send what is dirty". Nothing changes on failure.

        ``which`` limits logging to the slots of the sections it accepts (memory that is not
        copied, such as shared memory a local live update hands over, needs no log and no
        write protection)."""
        if self.dirty_logging:
            return
        done: list[tuple[int, Section]] = []
        try:
            for section, slot in sorted(self._slots.items(), key=lambda kv: kv[1]):
                if which is not None and not which(section):
                    continue
                self._set_logging(slot, section, True)
                done.append((slot, section))
        except KvmError:
            for slot, section in done:
                try:
                    self._set_logging(slot, section, False)
                except KvmError as exc:  # pragma: no cover - turning logging off cannot fail
                    log.warning("kvm: cannot turn dirty logging off again: %s", exc)
            raise
        self.dirty_logging = True
        self._dirty_which = which
        self._dirty_all = {slot for slot, _ in done}
        self._dirty_pending = []

    def stop_dirty_log(self) -> None:
        """Turn dirty logging off for every memslot we hold; the kernel frees the bitmaps.

        Every slot is tried; the first failure is raised afterwards.
        """
        if not self.dirty_logging:
            return
        logged = [(section, slot) for section, slot in self._slots.items() if self._logged(section)]
        self.dirty_logging = False
        self._dirty_which = None
        self._dirty_all.clear()
        self._dirty_pending = []
        first: KvmError | None = None
        for section, slot in sorted(logged, key=lambda kv: kv[1]):
            try:
                self._set_logging(slot, section, False)
            except KvmError as exc:
                first = first or exc
        if first is not None:
            raise first

    def sync_dirty_log(self) -> list[DirtySlot]:
        """The pages written by the guest since the previous sync, one :class:`DirtySlot` per
        memslot (plus the last bitmaps of slots deleted meanwhile), by slot id.

        KVM's bitmaps are cleared (with manual protection: KVM_CLEAR_DIRTY_LOG of exactly the
        pages read) before this returns, so a page written after the sync shows up in the
        next one: read the pages only after syncing. Writes the VMM makes itself are not
        here (see :class:`memslots.migration.dirty.DirtyTracker`).
        """
        if not self.dirty_logging:
            raise KvmError("kvm: dirty logging is off (start_dirty_log first)", errno.ENOENT)
        out = self._dirty_pending
        self._dirty_pending = []
        for section, slot in sorted(self._slots.items(), key=lambda kv: kv[1]):
            if self._logged(section):
                out.append(self._take_dirty(slot, section))
        self._dirty_all.clear()
        return out

    def _logged(self, section: Section) -> bool:
        """Whether ``section``'s memslot is (or, created now, would be) dirty-logged."""
        which = self._dirty_which
        return self.dirty_logging and (which is None or which(section))

    def _take_dirty(self, slot: int, section: Section) -> DirtySlot:
        npages = section.size >> PAGE_SHIFT
        t0 = time.perf_counter()
        try:
            bitmap = self.vm.get_dirty_log(slot, npages)
            if self.dirty_log_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE and bitmap_any(bitmap):
                self.vm.clear_dirty_log(slot, 0, npages, bitmap)
        finally:
            self.kernel_seconds += time.perf_counter() - t0
        if slot in self._dirty_all:
            bitmap = full_bitmap(npages)
        return DirtySlot(slot, section, bytes(bitmap))

    def close(self) -> None:
        """Close the VM (the kernel frees every memslot with it)."""
        self._slots.clear()
        self.dirty_logging = False
        self._dirty_all.clear()
        self._dirty_pending = []
        self.vm.close()
