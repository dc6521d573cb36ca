"""What one KVM memslot costs the kernel (x86): per-page metadata arrays and their vmalloc pages.

The model follows ``kvm_alloc_memslot_metadata()`` and ``kvm_prepare_memory_region()``: every
per-page array is a separate ``__vcalloc`` (always vmalloc), so each costs whole pages plus,
for areas above 2 MiB, a vmalloc'ed ``struct page *`` array (recursively). The result predicts
``/proc/meminfo`` VmallocUsed to the page.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from memslots.errors import KvmError
from memslots.kvm.abi import PAGE_SHIFT, PAGE_SIZE
from memslots.sizes import align_up

# One level of the x86 page-table hierarchy maps 512 entries: 4 KiB -> 2 MiB -> 1 GiB.
_LEVEL_SHIFT = 9
_PTR_SIZE = 8
_RMAP_ENTRY = 8  # struct kvm_rmap_head: one atomic_long
_LPAGE_ENTRY = 4  # struct kvm_lpage_info: int disallow_lpage
_WRITE_TRACK_ENTRY = 2  # u16 counter per gfn


@dataclass(frozen=True)
class MmuConfig:
    """The host MMU mode, which decides which per-page arrays a memslot gets eagerly.

    ``shadow_paging``: shadow-paging structures are in use, either because TDP is off or
    because a shadow root exists (e.g. a nested guest) -- rmaps and ``gfn_write_track`` are
    allocated at slot creation. ``tdp_mmu``: TDP with the TDP MMU (rmaps and write tracking
    lazy). ``legacy_tdp``: TDP with ``tdp_mmu=N`` (rmaps eager, write tracking lazy).
    ``external_write_tracking``: CONFIG_KVM_EXTERNAL_WRITE_TRACKING=y (KVMGT) makes write
    tracking eager. ``smm``: two address spaces, so every RAM slot is paid twice.
    """

    shadow_paging: bool = True
    tdp_mmu: bool = False
    legacy_tdp: bool = False
    external_write_tracking: bool = False
    smm: bool = False

    def __post_init__(self) -> None:
        if self.tdp_mmu and self.legacy_tdp:
            raise ValueError("MmuConfig: tdp_mmu and legacy_tdp are mutually exclusive")
        if not (self.shadow_paging or self.tdp_mmu or self.legacy_tdp):
            raise ValueError("MmuConfig: one of shadow_paging, tdp_mmu, legacy_tdp must be set")

    @property
    def tdp_enabled(self) -> bool:
        """Whether the host uses two-dimensional paging (EPT/NPT)."""
        return self.tdp_mmu or self.legacy_tdp

    @property
    def eager_rmaps(self) -> bool:
        """``kvm_memslots_have_rmaps()``: ``!tdp_mmu_enabled || shadow_root_allocated``."""
        return self.shadow_paging or self.legacy_tdp

    @property
    def eager_write_tracking(self) -> bool:
        """``kvm_page_track_write_tracking_enabled()`` at slot creation."""
        return self.shadow_paging or self.external_write_tracking

    @property
    def address_spaces(self) -> int:
        """How many times each RAM slot exists (and is paid for)."""
        return 2 if self.smm else 1

    def describe(self) -> str:
        """One line for humans, e.g. ``shadow paging (rmaps + write tracking eager)``."""
        if self.tdp_mmu:
            mode = (
                "TDP MMU with a shadow root (rmaps + write tracking eager)"
                if self.shadow_paging
                else "TDP MMU (rmaps + write tracking lazy)"
            )
        elif self.legacy_tdp:
            mode = (
                "legacy TDP (tdp_mmu=N) with a shadow root (rmaps + write tracking eager)"
                if self.shadow_paging
                else "legacy TDP (tdp_mmu=N) (rmaps eager, write tracking lazy)"
            )
        else:
            mode = "shadow paging (rmaps + write tracking eager)"
        extras = []
        if self.external_write_tracking:
            extras.append("external write tracking")
        if self.smm:
            extras.append("SMM (2 address spaces, metadata x2)")
        return "; ".join([mode, *extras])


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
    per_space = sum(vmalloc_area_pages(n) for _, n in slot_arrays(base_gfn, npages, mmu, dirty_log))
    return per_space * mmu.address_spaces


def slot_metadata_bytes(gpa: int, size: int, mmu: MmuConfig, dirty_log: bool = False) -> int:
    """Bytes of VmallocUsed one memslot at ``gpa`` of ``size`` bytes costs (pages x 4 KiB)."""
    if gpa % PAGE_SIZE or size % PAGE_SIZE:
        raise ValueError(f"memslot gpa {gpa:#x} and size {size:#x} must be 4 KiB aligned")
    pages = slot_vmalloc_pages(gpa >> PAGE_SHIFT, size >> PAGE_SHIFT, mmu, dirty_log)
    return pages * PAGE_SIZE


def _read_flag(path: str) -> bool | None:
    """A Y/N or 1/0 module parameter; None when the file does not exist."""
    try:
        with open(path) as f:
            return f.read().strip() in ("Y", "y", "1")
    except FileNotFoundError:
        return None


def _has_external_write_tracking(boot_config: str) -> bool:
    try:
        with open(boot_config) as f:
            return any(line.strip() == "CONFIG_KVM_EXTERNAL_WRITE_TRACKING=y" for line in f)
    except OSError:
        return False


def detect_host_mmu(
    *,
    sysfs_root: str = "/sys/module",
    kvm_path: str = "/dev/kvm",
    smm: bool | None = None,
    boot_config: str | None = None,
) -> MmuConfig:
    """The host's MMU configuration, from KVM's module parameters.

    TDP is on when ``kvm_intel.ept`` or ``kvm_amd.npt`` is set; without either module (for
    example ``kvm_pvm``) KVM uses shadow paging. With TDP, ``kvm.tdp_mmu`` chooses the TDP MMU
    or the legacy one. ``smm=None`` asks a throw-away VM for KVM_CAP_MULTI_ADDRESS_SPACE > 1
    (False without ``/dev/kvm``). ``boot_config`` (default ``/boot/config-$(uname -r)``) is
    searched for CONFIG_KVM_EXTERNAL_WRITE_TRACKING=y.
    """
    ept = _read_flag(os.path.join(sysfs_root, "kvm_intel", "parameters", "ept"))
    npt = _read_flag(os.path.join(sysfs_root, "kvm_amd", "parameters", "npt"))
    tdp = bool(ept) or bool(npt)
    # The parameter is missing on kernels that predate the TDP MMU.
    tdp_mmu = tdp and bool(_read_flag(os.path.join(sysfs_root, "kvm", "parameters", "tdp_mmu")))
    if boot_config is None:
        boot_config = f"/boot/config-{os.uname().release}"
    if smm is None:
        smm = _probe_smm(kvm_path)
    return MmuConfig(
        shadow_paging=not tdp,
        tdp_mmu=tdp_mmu,
        legacy_tdp=tdp and not tdp_mmu,
        external_write_tracking=_has_external_write_tracking(boot_config),
        smm=smm,
    )


def _probe_smm(kvm_path: str) -> bool:
    # Imported here because memslots.kvm.vm itself uses detect_host_mmu.
    from memslots.kvm.vm import KvmVm

    if not os.path.exists(kvm_path):
        return False
    try:
        with KvmVm(kvm_path) as vm:
            return vm.nr_address_spaces > 1
    except KvmError:
        return False


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

    def to_json(self) -> dict[str, float]:
        """``{"delete_ms", "refault_ms", "total_ms"}``."""
        return {
            "delete_ms": self.delete_ms,
            "refault_ms": self.refault_ms,
            "total_ms": self.total_ms,
        }


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
