"""The host kernel's MMU mode, which decides which per-page arrays a KVM memslot gets eagerly,
and how to read it from KVM's module parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass


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


def read_host_mmu(
    *, smm: bool, sysfs_root: str = "/sys/module", boot_config: str | None = None
) -> MmuConfig:
    """The host's MMU configuration from KVM's module parameters; ``smm`` as the caller knows it.

    TDP is on when ``kvm_intel.ept`` or ``kvm_amd.npt`` is set; without either module (for
    example ``kvm_pvm``) KVM uses shadow paging. With TDP, ``kvm.tdp_mmu`` chooses the TDP MMU
    or the legacy one. ``boot_config`` (default ``/boot/config-$(uname -r)``) is searched for
    CONFIG_KVM_EXTERNAL_WRITE_TRACKING=y. :func:`memslots.kvm.host.detect_host_mmu` also
    probes SMM.
    """
    ept = _read_flag(os.path.join(sysfs_root, "kvm_intel", "parameters", "ept"))
    npt = _read_flag(os.path.join(sysfs_root, "kvm_amd", "parameters", "npt"))
    tdp = bool(ept) or bool(npt)
    # The parameter is missing on kernels that predate the TDP MMU.
    tdp_mmu = tdp and bool(_read_flag(os.path.join(sysfs_root, "kvm", "parameters", "tdp_mmu")))
    if boot_config is None:
        boot_config = f"/boot/config-{os.uname().release}"
    return MmuConfig(
        shadow_paging=not tdp,
        tdp_mmu=tdp_mmu,
        legacy_tdp=tdp and not tdp_mmu,
        external_write_tracking=_has_external_write_tracking(boot_config),
        smm=smm,
    )
