"""KVM as a memslot consumer: one KVM memslot per RAM section of the system address space.

:class:`KvmAccel` owns the slot numbers (lowest free id first, freed ids reused, as
Cloud Hypervisor's and crosvm's allocators do) and drives a VM backend, which is either the real
kernel (:class:`memslots.kvm.vm.KvmVm`) or the model (:class:`memslots.kvm.model.KvmModel`). It
also predicts what the kernel spends on metadata for the slots it holds, and what each memslot
delete costs the guest (:func:`memslots.kvm.cost.unmap_cost`).
"""

from __future__ import annotations

import errno
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

from memslots.errors import KvmError
from memslots.kvm.abi import VmBackend
from memslots.kvm.cost import (
    DEFAULT_WORKING_SET_FRAMES,
    UnmapCost,
    slot_memcg_bytes,
    slot_metadata_bytes,
    unmap_cost,
)
from memslots.memory.address_space import Section
from memslots.memory.consumer import MemslotConsumer


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
    """

    name = "kvm"

    def __init__(self, vm: VmBackend, *, other_used: int = 0) -> None:
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
        t0 = time.perf_counter()
        try:
            self.vm.set_memory_region(slot, section.gpa, section.size, section.host_addr)
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

    def region_del(self, section: Section) -> None:
        slot = self._slots.pop(section)
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
        """Kernel vmalloc bytes our memslots (or those ``which`` selects) cost (kvm.cost)."""
        return sum(
            slot_metadata_bytes(s.gpa, s.size, self.vm.mmu)
            for s in self._slots
            if which is None or which(s)
        )

    def predicted_memcg_bytes(self, which: Callable[[Section], bool] | None = None) -> int:
        """Bytes our memslots (or those ``which`` selects) charge to our memory cgroup.

        The per-VM counterpart of :meth:`predicted_metadata_bytes`
        (:func:`~memslots.kvm.cost.slot_memcg_bytes`).
        """
        return sum(
            slot_memcg_bytes(s.gpa, s.size, self.vm.mmu)
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

    def close(self) -> None:
        """Close the VM (the kernel frees every memslot with it)."""
        self._slots.clear()
        self.vm.close()
