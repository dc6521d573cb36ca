"""virtio-mem's default block size (QEMU's virtio_mem_default_block_size) on real backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from memslots.devices.virtio_mem.device import default_block_size
from memslots.host.memory import FileBackend, MemfdBackend, RamBackend
from memslots.host.pages import thp_size
from memslots.sizes import KiB, MiB

SIZE = 8 * MiB


def test_default_block_size_for_base_page_backends_is_thp(tmp_path: Path) -> None:
    pmd = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
    if not pmd.exists() or pmd.read_text() != "2097152\n":
        pytest.skip("host THP size is not 2 MiB")
    assert thp_size() == 2 * MiB
    with RamBackend("r", SIZE) as ram, MemfdBackend("m", SIZE) as memfd:
        assert default_block_size(ram) == 2 * MiB
        assert default_block_size(memfd) == 2 * MiB
    with FileBackend("f", SIZE, tmp_path) as file:
        assert default_block_size(file) == 2 * MiB


def test_default_block_size_for_other_page_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Huge pages smaller than 1 MiB (64 KiB on arm64) are raised to virtio-mem's 1 MiB minimum.
    with RamBackend("r", SIZE) as mem:
        monkeypatch.setattr(mem, "page_size", 64 * KiB)
        assert default_block_size(mem) == MiB
        monkeypatch.setattr(mem, "page_size", 32 * MiB)
        assert default_block_size(mem) == 32 * MiB
