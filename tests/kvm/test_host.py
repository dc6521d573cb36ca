"""The host, detected once from its sources (here fake ones), and described for planning."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import AMD_HOST, HOST

from memslots.errors import OptionError
from memslots.kvm.host import HostInfo, detect_host, host_info
from memslots.sizes import GiB, MiB


def _fake_host(root: Path, *, thp: str | None, regions: str | None, huge_kb: int | None) -> Path:
    sys = root / "sys"
    (sys / "module").mkdir(parents=True)
    if thp is not None:
        thp_dir = sys / "kernel" / "mm" / "transparent_hugepage"
        thp_dir.mkdir(parents=True)
        (thp_dir / "hpage_pmd_size").write_text(thp)
    if regions is not None:
        params = sys / "module" / "vhost" / "parameters"
        params.mkdir(parents=True)
        (params / "max_mem_regions").write_text(regions)
    (root / "cpuinfo").write_text("vendor_id\t: GenuineIntel\naddress sizes\t: 46 bits physical\n")
    (root / "meminfo").write_text(f"Hugepagesize:    {huge_kb} kB\n" if huge_kb else "")
    return root


def _detect(root: Path, *, vhost_net: bool = False) -> HostInfo:
    if vhost_net:
        (root / "vhost-net").touch()
    return detect_host(
        kvm_path=str(root / "no-kvm"),
        cpuinfo=str(root / "cpuinfo"),
        sysfs_root=str(root / "sys"),
        meminfo=str(root / "meminfo"),
        vhost_net_path=str(root / "vhost-net"),
    )


def test_everything_the_host_offers_is_detected_from_its_sources(tmp_path: Path) -> None:
    root = _fake_host(tmp_path, thp="4194304\n", regions="509\n", huge_kb=1048576)
    host = _detect(root, vhost_net=True)
    assert host == HostInfo(
        cpu_vendor="intel",
        phys_bits=46,
        mmu=host.mmu,
        kvm=False,
        kvm_max_memslots=32764,
        thp_size=4 * MiB,
        page_size=HOST.page_size,
        huge_page_size=GiB,
        vhost_kernel_max_mem_regions=509,
        vhost_net=True,
        sources=host.sources,
    )
    assert host.source("huge_page_size") == str(root / "meminfo")
    assert host.source("cpu_vendor") == str(root / "cpuinfo")
    assert host.source("kvm_max_memslots") == "default"
    assert host.source("vhost_kernel_max_mem_regions") == "sysfs"


def test_missing_sources_give_qemus_defaults(tmp_path: Path) -> None:
    root = _fake_host(tmp_path, thp=None, regions=None, huge_kb=None)
    host = _detect(root)
    # No THP (QEMU 9.2: 1 MiB), vhost's default 64 regions, x86-64's 2 MiB huge pages.
    assert (host.thp_size, host.vhost_kernel_max_mem_regions, host.huge_page_size) == (
        MiB,
        64,
        2 * MiB,
    )
    assert host.vhost_net is False
    assert host.source("vhost_kernel_max_mem_regions") == "default"


def test_the_host_is_detected_once() -> None:
    assert host_info() is host_info() is HOST


def test_overrides_are_marked_and_checked() -> None:
    host = AMD_HOST.override(thp_size=32 * MiB, phys_bits=None)
    assert host.thp_size == 32 * MiB and host.phys_bits == AMD_HOST.phys_bits
    assert host.source("thp_size") == "override"
    assert host.pages.thp_size == 32 * MiB
    assert host.to_json()["huge_page_size"] == AMD_HOST.huge_page_size
    with pytest.raises(OptionError, match="physical address bits 60"):
        AMD_HOST.override(phys_bits=60)
