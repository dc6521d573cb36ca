"""The per-memslot kernel metadata model against the worked tables (A4, A5) of
docs/reference/kvm-memslot-cost.md, which the comments below cite by section."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import requires_kvm_pvm

from memslots.kvm.cost import (
    SLOT_STRUCT_CHARGE,
    lpages,
    memcg_area_pages,
    slot_arrays,
    slot_memcg_bytes,
    slot_metadata_bytes,
    slot_vmalloc_pages,
    vmalloc_area_pages,
)
from memslots.kvm.host import detect_host_mmu
from memslots.kvm.mmu import MmuConfig
from memslots.sizes import GiB, MiB, TiB

SHADOW = MmuConfig()
TDP_MMU = MmuConfig(shadow_paging=False, tdp_mmu=True)
LEGACY_TDP = MmuConfig(shadow_paging=False, legacy_tdp=True)

# docs/reference/kvm-memslot-cost.md A4, "Computed examples": vmalloc pages per slot size for
# (shadow, TDP MMU, shadow + dirty log, TDP MMU + dirty log).
TABLE = [
    (2 * MiB, 6, 2, 7, 3),
    (128 * MiB, 84, 2, 86, 4),
    (1 * GiB, 644, 2, 660, 18),
    (4 * GiB, 2572, 3, 2636, 67),
    (64 * GiB, 41138, 33, 42164, 1059),
    (1 * TiB, 658183, 513, 674599, 16929),
]


@pytest.mark.parametrize(("size", "shadow", "tdp", "shadow_dirty", "tdp_dirty"), TABLE)
def test_kvm_md_table(size: int, shadow: int, tdp: int, shadow_dirty: int, tdp_dirty: int) -> None:
    npages = size // 4096
    assert slot_vmalloc_pages(0, npages, SHADOW) == shadow
    assert slot_vmalloc_pages(0, npages, TDP_MMU) == tdp
    assert slot_vmalloc_pages(0, npages, SHADOW, dirty_log=True) == shadow_dirty
    assert slot_vmalloc_pages(0, npages, TDP_MMU, dirty_log=True) == tdp_dirty


def test_table_mib_values() -> None:
    # kvm-memslot-cost.md quotes 2571.03 MiB for 1 TiB (shadow) and 10.047 MiB for 4 GiB.
    assert slot_metadata_bytes(0, TiB, SHADOW) / MiB == pytest.approx(2571.03, abs=0.005)
    assert slot_metadata_bytes(0, 4 * GiB, SHADOW) / MiB == pytest.approx(10.047, abs=0.0005)


def test_external_write_tracking_1tib() -> None:
    mmu = MmuConfig(shadow_paging=False, tdp_mmu=True, external_write_tracking=True)
    assert slot_vmalloc_pages(0, TiB // 4096, mmu) == 131841


def test_1tib_per_array_breakdown() -> None:
    # A5: every array of the 1 TiB shadow-paging slot, nested page arrays included.
    pages = {name: vmalloc_area_pages(n) for name, n in slot_arrays(0, TiB // 4096, SHADOW)}
    assert pages == {
        "rmap 4K": 525314,
        "rmap 2M": 1026,
        "rmap 1G": 2,
        "lpage_info 2M": 512,
        "lpage_info 1G": 1,
        "gfn_write_track": 131328,
    }


def test_4gib_per_array_breakdown() -> None:
    arrays = dict(slot_arrays(0, 4 * GiB // 4096, SHADOW))
    assert arrays["rmap 4K"] == 8 * MiB
    assert arrays["gfn_write_track"] == 2 * MiB
    pages = {name: vmalloc_area_pages(n) for name, n in arrays.items()}
    assert pages == {
        "rmap 4K": 2052,
        "rmap 2M": 4,
        "rmap 1G": 1,
        "lpage_info 2M": 2,
        "lpage_info 1G": 1,
        "gfn_write_track": 512,
    }


@pytest.mark.parametrize(
    ("nbytes", "pages"),
    [
        (0, 0),
        (1, 1),
        (4096, 1),
        (4097, 2),
        # 512 pages need a 4096-byte pointer array: kmalloc'ed, not counted.
        (2 * MiB, 512),
        # 513 pages need 4104 bytes of pointers: a vmalloc'ed 2-page array.
        (2 * MiB + 4096, 515),
    ],
)
def test_vmalloc_area_pages_rounding(nbytes: int, pages: int) -> None:
    assert vmalloc_area_pages(nbytes) == pages


def test_lpages_aligned() -> None:
    n = GiB // 4096
    assert (lpages(0, n, 1), lpages(0, n, 2), lpages(0, n, 3)) == (n, 512, 1)
    # An aligned slot smaller than 1 GiB still needs one 1G entry.
    assert lpages(0, 512, 3) == 1


@pytest.mark.parametrize(
    ("base_gfn", "npages", "level", "expected"),
    [
        (1, 512, 2, 2),  # 2 MiB starting one page in spans two 2M frames
        (1, 512, 3, 1),
        (511, 2, 2, 2),  # two pages straddling a 2M boundary
        (262143, 2, 3, 2),  # two pages straddling a 1G boundary
        (262143, 2, 2, 2),
        (512, 512, 2, 1),  # aligned, not at zero
        (1, 262144, 2, 513),
        (1, 262144, 3, 2),
    ],
)
def test_lpages_misaligned(base_gfn: int, npages: int, level: int, expected: int) -> None:
    assert lpages(base_gfn, npages, level) == expected


def test_misaligned_1gib_slot_costs_one_more_page() -> None:
    # 1 GiB one page off alignment: rmap 2M has 513 entries (4104 B, 2 pages instead of 1),
    # lpage_info 2M grows to 2052 B (still 1 page), rmap/lpage 1G to 2 entries (still 1 page).
    n = GiB // 4096
    arrays = dict(slot_arrays(1, n, SHADOW))
    assert arrays["rmap 2M"] == 8 * 513
    assert arrays["lpage_info 1G"] == 4 * 2
    assert slot_vmalloc_pages(1, n, SHADOW) == slot_vmalloc_pages(0, n, SHADOW) + 1 == 645


def test_legacy_tdp_has_rmaps_but_no_write_tracking() -> None:
    names = [name for name, _ in slot_arrays(0, GiB // 4096, LEGACY_TDP)]
    assert "rmap 4K" in names
    assert "gfn_write_track" not in names
    # rmap 4K (2 MiB = 512 pages) + rmap 2M + rmap 1G + two lpage_info pages.
    assert slot_vmalloc_pages(0, GiB // 4096, LEGACY_TDP) == 512 + 1 + 1 + 2


def test_tdp_mmu_with_shadow_root_costs_like_shadow_paging() -> None:
    # kvm-memslot-cost.md A4: "Shadow paging (or TDP MMU after a shadow root exists)".
    nested = MmuConfig(shadow_paging=True, tdp_mmu=True)
    assert slot_vmalloc_pages(0, GiB // 4096, nested) == slot_vmalloc_pages(0, GiB // 4096, SHADOW)


@pytest.mark.parametrize("mmu", [SHADOW, TDP_MMU, LEGACY_TDP])
@pytest.mark.parametrize("size", [2 * MiB, 4 * GiB])
def test_smm_doubles_everything(mmu: MmuConfig, size: int) -> None:
    smm = MmuConfig(mmu.shadow_paging, mmu.tdp_mmu, mmu.legacy_tdp, smm=True)
    for dirty in (False, True):
        single = slot_vmalloc_pages(0, size // 4096, mmu, dirty)
        assert slot_vmalloc_pages(0, size // 4096, smm, dirty) == 2 * single


def test_metadata_bytes_is_pages_times_4k_and_uses_gpa() -> None:
    gpa = 4096  # misaligned base gfn 1
    assert slot_metadata_bytes(gpa, GiB, SHADOW) == 645 * 4096
    assert slot_metadata_bytes(0, 0, SHADOW) == 0
    with pytest.raises(ValueError, match="aligned"):
        slot_metadata_bytes(2048, GiB, SHADOW)
    with pytest.raises(ValueError, match="aligned"):
        slot_metadata_bytes(0, GiB + 1, SHADOW)
    with pytest.raises(ValueError):
        slot_vmalloc_pages(-1, 1, SHADOW)


def test_mmu_config_validation_and_describe() -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        MmuConfig(tdp_mmu=True, legacy_tdp=True)
    with pytest.raises(ValueError, match="must be set"):
        MmuConfig(shadow_paging=False)
    assert "shadow paging" in SHADOW.describe()
    assert "TDP MMU" in TDP_MMU.describe() and "lazy" in TDP_MMU.describe()
    assert "tdp_mmu=N" in LEGACY_TDP.describe()
    both = MmuConfig(shadow_paging=False, tdp_mmu=True, external_write_tracking=True, smm=True)
    assert "external write tracking" in both.describe() and "SMM" in both.describe()
    assert SHADOW.address_spaces == 1 and both.address_spaces == 2


def _fake_sysfs(root: Path, params: dict[str, str]) -> str:
    for key, value in params.items():
        module, name = key.split(".")
        d = root / module / "parameters"
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(value + "\n")
    return str(root)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"kvm.tdp_mmu": "N", "kvm_pvm.force": "N"}, SHADOW),
        ({"kvm.tdp_mmu": "Y", "kvm_intel.ept": "Y"}, TDP_MMU),
        ({"kvm.tdp_mmu": "N", "kvm_intel.ept": "Y"}, LEGACY_TDP),
        ({"kvm.tdp_mmu": "Y", "kvm_intel.ept": "N"}, SHADOW),
        ({"kvm.tdp_mmu": "Y", "kvm_amd.npt": "1"}, TDP_MMU),
        ({"kvm.tdp_mmu": "Y", "kvm_amd.npt": "0"}, SHADOW),
        ({"kvm_intel.ept": "Y"}, LEGACY_TDP),  # kernels before the TDP MMU
    ],
)
def test_detect_host_mmu_from_sysfs(
    tmp_path: Path, params: dict[str, str], expected: MmuConfig
) -> None:
    root = _fake_sysfs(tmp_path / "sys", params)
    got = detect_host_mmu(sysfs_root=root, smm=False, boot_config=str(tmp_path / "none"))
    assert got == expected


def test_detect_external_write_tracking_and_smm(tmp_path: Path) -> None:
    root = _fake_sysfs(tmp_path / "sys", {"kvm.tdp_mmu": "Y", "kvm_intel.ept": "Y"})
    config = tmp_path / "config"
    config.write_text("CONFIG_KVM=m\nCONFIG_KVM_EXTERNAL_WRITE_TRACKING=y\n")
    got = detect_host_mmu(sysfs_root=root, smm=True, boot_config=str(config))
    assert got == MmuConfig(
        shadow_paging=False, tdp_mmu=True, external_write_tracking=True, smm=True
    )


def test_detect_smm_without_kvm_device(tmp_path: Path) -> None:
    root = _fake_sysfs(tmp_path / "sys", {"kvm.tdp_mmu": "N"})
    got = detect_host_mmu(
        sysfs_root=root, kvm_path=str(tmp_path / "kvm"), boot_config=str(tmp_path / "none")
    )
    assert got.smm is False


@requires_kvm_pvm
def test_detect_host_mmu_on_this_host() -> None:
    # kvm_pvm uses shadow paging; docs/reference/kvm-memslot-cost.md A2 says this kernel has no SMM.
    mmu = detect_host_mmu()
    assert mmu.shadow_paging and not mmu.tdp_enabled
    assert mmu.smm is False


# -- what a memslot charges to its creator's memory cgroup ------------------------------------


def _nested_pages(nbytes: int) -> int:
    """A4's nested(): the vmalloc'ed page-pointer arrays of one area, recursively."""
    return vmalloc_area_pages(nbytes) - memcg_area_pages(nbytes)


@pytest.mark.parametrize(("size", "shadow", "tdp", "shadow_dirty", "tdp_dirty"), TABLE)
def test_memcg_is_vmalloc_without_nested_arrays_plus_the_slot_struct(
    size: int, shadow: int, tdp: int, shadow_dirty: int, tdp_dirty: int
) -> None:
    """Per array, the memcg is charged the data pages (``GFP_KERNEL_ACCOUNT``), not the nested
    ``struct page *`` arrays (allocated with the reclaim bits only); per slot, the kmalloc'ed
    ``struct kvm_memory_slot`` adds 520 bytes (kmalloc-cg-512 + the obj_cgroup pointer)."""
    for mmu, dirty, vmalloc_pages in (
        (SHADOW, False, shadow),
        (TDP_MMU, False, tdp),
        (SHADOW, True, shadow_dirty),
        (TDP_MMU, True, tdp_dirty),
    ):
        nested = sum(_nested_pages(n) for _, n in slot_arrays(0, size // 4096, mmu, dirty))
        assert slot_memcg_bytes(0, size, mmu, dirty) == (
            (vmalloc_pages - nested) * 4096 + SLOT_STRUCT_CHARGE
        )


def test_memcg_worked_examples() -> None:
    # 64 GiB on shadow paging: 32768 + 64 + 1 (rmaps) + 32 + 1 (lpage_info) + 8192 (write
    # tracking) = 41058 pages; VmallocUsed adds 64 + 16 pages of page pointers (41138).
    assert slot_memcg_bytes(0, 64 * GiB, SHADOW) == 41058 * 4096 + 520
    # 1 TiB: 656899 data pages (2565.98 MiB) against VmallocUsed's 658183 (2571.03 MiB).
    assert slot_memcg_bytes(0, TiB, SHADOW) == 656899 * 4096 + 520
    # A tiny slot: 6 data pages (3 rmaps, 2 lpage_info, 1 write tracking) + the struct.
    assert slot_memcg_bytes(0, 4096, SHADOW) == 6 * 4096 + 520
    assert memcg_area_pages(0) == 0 and memcg_area_pages(1) == 1 and memcg_area_pages(4097) == 2


def test_memcg_with_smm_is_paid_twice() -> None:
    smm = MmuConfig(smm=True)
    assert slot_memcg_bytes(0, GiB, smm) == 2 * slot_memcg_bytes(0, GiB, SHADOW)
    assert slot_memcg_bytes(0, 0, SHADOW) == 0
    with pytest.raises(ValueError):
        slot_memcg_bytes(1, 4096, SHADOW)
