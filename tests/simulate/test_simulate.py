"""simulate: scenarios (options: tests/options; end-to-end runs: machine/test_guest_vm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memslots.errors import OptionError
from memslots.simulate.run import scenario
from memslots.sizes import GiB, MiB


def test_scenarios() -> None:
    ramp = scenario("ramp-up", 8 * GiB, 2 * MiB, steps=4)
    assert [s.requested for s in ramp] == [0, 2 * GiB, 4 * GiB, 6 * GiB, 8 * GiB]
    saw = [s.requested for s in scenario("sawtooth", 8 * GiB, 2 * MiB, steps=4)]
    assert saw == [0, 4 * GiB, 8 * GiB, 4 * GiB, 0, 4 * GiB, 8 * GiB, 4 * GiB, 0]
    burst = [s.requested for s in scenario("burst", 16 * GiB, 2 * MiB)]
    assert max(burst) == 16 * GiB and burst[0] == GiB and burst[-1] == 0
    times = [s.time for s in ramp]
    assert times == sorted(times) and len(set(times)) == len(times)
    with pytest.raises(OptionError, match="unknown scenario 'zigzag'"):
        scenario("zigzag", GiB, 2 * MiB)


def test_plots_name_the_source_of_measured_figures(tmp_path: Path) -> None:
    from memslots.simulate.plots import measured_label, write_plots
    from memslots.simulate.run import SimResult, StepRecord

    assert measured_label("cgroup") == "per-VM cgroup"
    assert "may include other processes" in measured_label("system")

    def step(t: float, measured: int) -> StepRecord:
        return StepRecord(
            time=t, requested=0, plugged=0, memslots_mapped=0, requests={}, responses={},
            memslot_creates=0, memslot_deletes=0, kernel_metadata_bytes=4096,
            kernel_metadata_measured=measured, ideal_metadata_bytes=0,
            single_metadata_bytes=8192, outcome="reached", memslot_map=[False],
            kernel_metadata_source="system", kernel_metadata_source_model=4096,
        )  # fmt: skip

    result = SimResult("dynamic", True, {"id": "vmem0"}, [step(0, 4096), step(1, -3 << 20)])
    files = write_plots([result], tmp_path)
    assert len(files) == 6 and all(f.stat().st_size > 0 for f in files)
