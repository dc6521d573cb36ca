"""What one KVM memslot costs the kernel (x86): per-page metadata arrays and their vmalloc pages.

The model follows ``kvm_alloc_memslot_metadata()`` and ``kvm_prepare_memory_region()``: every
per-page array is a separate ``__vcalloc`` (always vmalloc), so each costs whole pages plus,
for areas above 2 MiB, a vmalloc'ed ``struct page *`` array (recursively). The result predicts
``/proc/meminfo`` VmallocUsed to the page.

:func:`slot_memcg_bytes` predicts what the same slot charges to the memory cgroup of the task
that creates it (``GFP_KERNEL_ACCOUNT``): the data pages of each array, without the nested
page-pointer arrays (vmalloc allocates those with the reclaim bits of the caller's flags only,
so without ``__GFP_ACCOUNT``), plus the slab charge of the ``struct kvm_memory_slot``.

:func:`unmap_cost` predicts what deleting a memslot costs the guest in time (the delete, and
with KVM's SLOT_ZAP_ALL quirk the re-fault of its working set), from constants measured by
``bench/unplug_cost.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from memslots.kvm.abi import PAGE_SHIFT, PAGE_SIZE
from memslots.kvm.mmu import MmuConfig
from memslots.sizes import align_up

# One level of the x86 page-table hierarchy maps 512 entries: 4 KiB -> 2 MiB -> 1 GiB.
_LEVEL_SHIFT = 9
_PTR_SIZE = 8
_RMAP_ENTRY = 8  # struct kvm_rmap_head: one atomic_long
_LPAGE_ENTRY = 4  # struct kvm_lpage_info: int disallow_lpage
_WRITE_TRACK_ENTRY = 2  # u16 counter per gfn


def lpages(base_gfn: int, npages: int, level: int) -> int:
    """Entries a per-level array needs: the level-``level`` frames the slot touches (1 = 4 KiB).

    A misaligned ``base_gfn`` can touch one more large frame than an aligned slot of equal size.
    """
    if npages <= 0:
        return 0
    shift = _LEVEL_SHIFT * (level - 1)
    return ((base_gfn + npages - 1) >> shift) - (base_gfn >> shift) + 1


def vmalloc_area_pages(nbytes: int) -> int:
    """VmallocUsed pages of one ``__vcalloc`` of ``nbytes``, incl. nested page-pointer arrays.

    vmalloc keeps a ``struct page *`` per page; when that array exceeds a page it is itself
    vmalloc'ed (and counted), recursively. Smaller arrays come from kmalloc and are not counted.
    """
    if nbytes <= 0:
        return 0
    pages = -(-nbytes // PAGE_SIZE)
    total = pages
    while pages * _PTR_SIZE > PAGE_SIZE:
        pages = -(-(pages * _PTR_SIZE) // PAGE_SIZE)
        total += pages
    return total


def slot_arrays(
    base_gfn: int, npages: int, mmu: MmuConfig, dirty_log: bool = False
) -> list[tuple[str, int]]:
    """The vmalloc'ed arrays of one slot in one address space, as ``(name, bytes)`` pairs."""
    if npages <= 0:
        return []
    arrays: list[tuple[str, int]] = []
    if mmu.eager_rmaps:
        for level, name in ((1, "rmap 4K"), (2, "rmap 2M"), (3, "rmap 1G")):
            arrays.append((name, _RMAP_ENTRY * lpages(base_gfn, npages, level)))
    # lpage_info exists for every slot, whatever the MMU.
    for level, name in ((2, "lpage_info 2M"), (3, "lpage_info 1G")):
        arrays.append((name, _LPAGE_ENTRY * lpages(base_gfn, npages, level)))
    if mmu.eager_write_tracking:
        arrays.append(("gfn_write_track", _WRITE_TRACK_ENTRY * npages))
    if dirty_log:
        # Twice the bitmap: the second half is GET/CLEAR_DIRTY_LOG's scratch buffer.
        arrays.append(("dirty_bitmap", 2 * align_up(npages, 64) // 8))
    return arrays


def slot_vmalloc_pages(base_gfn: int, npages: int, mmu: MmuConfig, dirty_log: bool = False) -> int:
    """VmallocUsed pages one memslot costs, summed over its address spaces (x2 with SMM)."""
    if base_gfn < 0 or npages < 0:
        raise ValueError(f"negative base_gfn {base_gfn} or npages {npages}")
    return _slot_vmalloc_pages(base_gfn, npages, mmu, dirty_log)


@functools.lru_cache(maxsize=4096)
def _slot_vmalloc_pages(base_gfn: int, npages: int, mmu: MmuConfig, dirty_log: bool) -> int:
    # Cached: a simulation asks about the same few memslots at every change of the memory map.
    per_space = sum(vmalloc_area_pages(n) for _, n in slot_arrays(base_gfn, npages, mmu, dirty_log))
    return per_space * mmu.address_spaces


def slot_metadata_bytes(gpa: int, size: int, mmu: MmuConfig, dirty_log: bool = False) -> int:
    """Bytes of VmallocUsed one memslot at ``gpa`` of ``size`` bytes costs (pages x 4 KiB)."""
    if gpa % PAGE_SIZE or size % PAGE_SIZE:
        raise ValueError(f"memslot gpa {gpa:#x} and size {size:#x} must be 4 KiB aligned")
    pages = slot_vmalloc_pages(gpa >> PAGE_SHIFT, size >> PAGE_SHIFT, mmu, dirty_log)
    return pages * PAGE_SIZE


#: What ``kzalloc(sizeof(struct kvm_memory_slot), GFP_KERNEL_ACCOUNT)`` charges to the memory
#: cgroup: the struct (~290 B on x86-64) comes from kmalloc-cg-512, and an accounted slab object
#: is charged its slab size plus the ``struct obj_cgroup *`` kept for it (``obj_full_size``).
#: Measured here: 1000 4 KiB slots charge 6127 pages (6000 data pages + 127 = ceil(1000 x 520 /
#: 4096)); 4000 slots charge 24508 (24000 + 508).
SLOT_STRUCT_CHARGE = 512 + _PTR_SIZE


def memcg_area_pages(nbytes: int) -> int:
    """Pages one ``__vcalloc`` of ``nbytes`` charges to the memory cgroup: its data pages only.

    ``__vmalloc_area_node`` charges each data page (``__GFP_ACCOUNT`` comes with
    ``GFP_KERNEL_ACCOUNT``) but allocates the ``struct page *`` array with
    ``(gfp & GFP_RECLAIM_MASK) | __GFP_ZERO``, which drops ``__GFP_ACCOUNT``.
    """
    return -(-nbytes // PAGE_SIZE) if nbytes > 0 else 0


def slot_memcg_bytes(gpa: int, size: int, mmu: MmuConfig, dirty_log: bool = False) -> int:
    """Bytes one memslot at ``gpa`` of ``size`` bytes charges to its creator's memory cgroup.

    Data pages of every array plus :data:`SLOT_STRUCT_CHARGE`, per address space (x2 with SMM:
    each address space has its own ``struct kvm_memory_slot`` and arrays). The slab part is
    charged in whole pages from a per-CPU stock, so a reading of several slots can differ from
    this sum by less than a page per CPU.
    """
    if gpa % PAGE_SIZE or size % PAGE_SIZE:
        raise ValueError(f"memslot gpa {gpa:#x} and size {size:#x} must be 4 KiB aligned")
    if size == 0:
        return 0
    arrays = slot_arrays(gpa >> PAGE_SHIFT, size >> PAGE_SHIFT, mmu, dirty_log)
    per_space = sum(memcg_area_pages(n) for _, n in arrays) * PAGE_SIZE + SLOT_STRUCT_CHARGE
    return per_space * mmu.address_spaces


# -- what unmapping a memslot costs the guest --------------------------------------------------
#
# Deleting a memslot stalls the guest twice: the delete itself (the kernel holds the MMU lock
# while it zaps shadow pages and walks the slot) and, when KVM_X86_QUIRK_SLOT_ZAP_ALL is in
# effect, the re-fault of everything the vCPUs use afterwards, because the quirk zaps *every*
# shadow page of the VM, not just the slot's. The formula (shadow paging, Linux 6.12+), with S
# the slot size in GiB and W the guest's working set in frames:
#
#   quirk on:  delete  = ZAP_ALL_BASE + ZAP_ALL_PER_FRAME * W + FREE_PER_GIB * S
#              refault = REFAULT_PER_FRAME * W
#   quirk off: delete  = ZAP_SLOT_BASE + S * (ZAP_SLOT_PER_GIB + ZAP_SLOT_PER_GIB_FRAME * W
#                                             + ZAP_SLOT_PER_GIB_FRAME2 * W^2)
#              refault = 0
#
# A frame is a 2 MiB guest page in which the vCPU keeps using one 4 KiB host page: one shadow
# page and one SPTE, what bench/unplug_cost.py's probe vCPU touches (a guest using 4 KiB pages
# has at least one shadow page per 2 MiB it touches). With the quirk on, the kernel zaps all W
# shadow pages (fast zap), frees the slot's metadata (vfree, linear in S), and the vCPU then
# faults every frame back in. With it off, the kernel visits every 4 KiB gfn of the slot: it
# zaps the slot's rmaps and looks each gfn up in the shadow-page hash
# (kvm_mmu_zap_memslot_pages_and_flush), whose 4096 buckets chain the VM's W shadow pages, so
# the walk costs S * (a + b * W) visits; the cost of a visit itself grows with W once the
# shadow pages no longer fit in the CPU caches, which the (empirical) W^2 term captures. It was
# fitted on W in {0, 2048, 16384}; beyond that it is an extrapolation.


@dataclass(frozen=True)
class UnmapCostConstants:
    """The measured constants of the unmap-cost formula (milliseconds; see above).

    ``host`` and ``source`` say where they were measured: hosts differ (CPU, caches, nesting,
    kernel, THP, TDP instead of shadow paging), so re-run ``bench/unplug_cost.py`` on the host
    that matters and use its fit (``--json``'s ``"fit"``) rather than trusting these elsewhere.
    """

    host: str
    source: str
    zap_all_base_ms: float
    zap_all_per_frame_ms: float
    free_per_gib_ms: float
    zap_slot_base_ms: float
    zap_slot_per_gib_ms: float
    zap_slot_per_gib_frame_ms: float
    zap_slot_per_gib_frame2_ms: float
    refault_per_frame_ms: float

    def to_json(self) -> dict[str, object]:
        """All fields, for ``--json`` outputs."""
        return dataclasses.asdict(self)


#: Measured by ``bench/unplug_cost.py`` (its default grid: quirk on/off x 1 GiB, 4 GiB, 1 TiB
#: x 0, 2048, 16384 frames) in CPU time, which on an idle host is the stall and which, unlike
#: wall-clock time, does not grow while other jobs keep this shared 2-CPU host busy: the "fit"
#: of bench/results/unplug_cost_calibration.json (2026-12-07), rounded. A later run's rows, this
#: model's predictions beside them and that run's own fit are in bench/results/unplug_cost.json.
UNMAP_COST_MEASURED = UnmapCostConstants(
    host=(
        "Intel Xeon (nested, kvm_pvm: shadow paging, rmaps + write tracking eager), "
        "Linux 6.18, 2 vCPUs"
    ),
    source="bench/unplug_cost.py, fit of its default grid (CPU time)",
    zap_all_base_ms=0.0614,
    zap_all_per_frame_ms=0.00182,
    free_per_gib_ms=0.0599,
    zap_slot_base_ms=0.0675,
    zap_slot_per_gib_ms=0.665,
    zap_slot_per_gib_frame_ms=0.000488,
    zap_slot_per_gib_frame2_ms=1.48e-8,
    refault_per_frame_ms=0.0265,
)

#: The guest working set assumed where none is given: 2048 frames (issue 12's case).
DEFAULT_WORKING_SET_FRAMES = 2048


@dataclass(frozen=True)
class UnmapCost:
    """What deleting one memslot costs the guest: the delete and the re-fault after it (ms)."""

    delete_ms: float
    refault_ms: float

    @property
    def total_ms(self) -> float:
        """The guest's whole stall for the delete."""
        return self.delete_ms + self.refault_ms


def unmap_cost(
    slot_size: int,
    *,
    slot_zap_all: bool,
    working_set_frames: int = DEFAULT_WORKING_SET_FRAMES,
    constants: UnmapCostConstants = UNMAP_COST_MEASURED,
) -> UnmapCost:
    """The predicted cost to the guest of deleting one memslot of ``slot_size`` bytes.

    ``slot_zap_all``: whether KVM_X86_QUIRK_SLOT_ZAP_ALL is in effect (the kernel's default);
    ``working_set_frames``: how many frames the vCPUs keep using elsewhere (see above).
    """
    if slot_size < 0 or working_set_frames < 0:
        raise ValueError(f"negative slot size {slot_size} or working set {working_set_frames}")
    c = constants
    gib = slot_size / (1 << 30)
    w = working_set_frames
    if slot_zap_all:
        delete = c.zap_all_base_ms + c.zap_all_per_frame_ms * w + c.free_per_gib_ms * gib
        return UnmapCost(delete, c.refault_per_frame_ms * w)
    per_gib = c.zap_slot_per_gib_ms + c.zap_slot_per_gib_frame_ms * w
    per_gib += c.zap_slot_per_gib_frame2_ms * w * w
    return UnmapCost(c.zap_slot_base_ms + gib * per_gib, 0.0)
