"""simulate: traces, scenarios and strategies (end-to-end runs are in test_vm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memslots.errors import OptionError
from memslots.options import parse_machine_config
from memslots.simulate.run import parse_strategy, parse_trace, scenario, with_strategy
from memslots.sizes import GiB, MiB


def test_parse_trace() -> None:
    steps = parse_trace("time,requested-size\n# warm up\n0,1G\n30.5, 512M\n\n60,0\n")
    assert [(s.time, s.requested) for s in steps] == [(0, GiB), (30.5, 512 * MiB), (60, 0)]


@pytest.mark.parametrize(
    "text,match",
    [
        ("0,1G\n10,2G,3\n", ":2: expected 'time,requested-size'"),
        ("0,1G\nsoon,2G\n", ":2: time 'soon' is not a number"),
        ("0,1G\n10,lots\n", ":2: invalid requested-size 'lots'"),
        ("10,1G\n5,2G\n", ":2: times must be non-negative and ascending"),
        ("# nothing\n", "has no steps"),
    ],
)
def test_parse_trace_errors(text: str, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        parse_trace(text, source="t.csv")


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


def test_strategies_rewrite_the_device() -> None:
    cfg = parse_machine_config(
        "4G,maxmem=68G", ["memory-backend-ram,id=m,size=64G"], ["virtio-mem,id=v,memdev=m"]
    )
    single = with_strategy(cfg, "v", "single").devices[0]
    dyn = with_strategy(cfg, "v", "dynamic").devices[0]
    fixed = with_strategy(cfg, "v", "fixed:512M").devices[0]
    assert (single.dynamic_memslots, single.memslot_size) == (False, None)
    assert dyn.dynamic_memslots is True
    assert fixed.memslot_size == 512 * MiB
    with pytest.raises(OptionError, match="unknown strategy 'huge'"):
        parse_strategy("huge")


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
