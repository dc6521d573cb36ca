"""Measurements on the real kernel: VmallocUsed against the model, single vs dynamic."""

from __future__ import annotations

import pytest
from conftest import requires_kvm

from memslots.errors import MeasurementError
from memslots.measure import compare, read_vmalloc_used
from memslots.sizes import GiB, TiB


def test_read_vmalloc_used(tmp_path: pytest.TempPathFactory) -> None:
    p = tmp_path / "meminfo"  # type: ignore[operator]
    p.write_text("MemTotal: 1 kB\nVmallocUsed:     14108 kB\n")
    assert read_vmalloc_used(str(p)) == 14108 * 1024
    p.write_text("MemTotal: 1 kB\n")
    with pytest.raises(MeasurementError, match="no VmallocUsed"):
        read_vmalloc_used(str(p))


@requires_kvm
def test_single_vs_dynamic_1t() -> None:
    """The acceptance case. It costs ~2.5 GiB of kernel memory for a few seconds."""
    result = compare(TiB, GiB)
    single, dynamic = result.single, result.dynamic
    assert (single.memslots_mapped, dynamic.memslots_mapped) == (1, 1)
    for run in (single, dynamic):
        tolerance = 0.02 * run.predicted_bytes + 64 * 4096
        assert abs(run.kernel_metadata_bytes - run.predicted_bytes) <= tolerance
    assert dynamic.kernel_metadata_bytes * 100 <= single.kernel_metadata_bytes
    data = result.to_json()
    assert set(data) >= {"single", "dynamic", "model", "ratios"}


@requires_kvm
def test_empty_device_costs_nothing_dynamic() -> None:
    result = compare(64 * GiB, 0)
    assert result.dynamic.memslots_mapped == 0
    assert abs(result.dynamic.kernel_metadata_bytes) <= 64 * 4096
    assert result.single.memslots_mapped == 1
    assert result.single.kernel_metadata_bytes >= 0.98 * result.single.predicted_bytes
