"""simulate: scenarios (options: tests/options; end-to-end runs: machine/test_guest_vm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memslots.errors import OptionError
from memslots.options import MAX_TRACE_SECONDS, parse_machine_config
from memslots.simulate.run import run_simulation, scenario, scenario_granule
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


def test_scenarios_ask_for_sizes_the_guest_reaches() -> None:
    # Boot RAM ending at 67 GiB (66 GiB: 3 below 4 GiB, 63 above) gives Linux 1 GiB memory
    # blocks (the largest power of two up to 2 GiB that divides the end); the driver adds
    # whole blocks that must fit the usable region (256 MiB past the request).
    big = parse_machine_config(
        "66G,maxmem=1090G",
        ["memory-backend-ram,id=mem0,size=1T,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"],
        accel="sim",
    )
    assert scenario_granule(big, "vmem0") == GiB
    ramp = scenario("ramp-up", 21 * GiB + 512 * MiB, GiB, steps=4)
    assert [s.requested // GiB for s in ramp] == [0, 5, 10, 16, 21]
    small = parse_machine_config(
        "4G,maxmem=68G",
        ["memory-backend-ram,id=mem0,size=64G,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0"],
        accel="sim",
    )
    assert scenario_granule(small, "vmem0") == 128 * MiB
    trace = scenario("sawtooth", 21 * GiB + 512 * MiB, 128 * MiB, steps=2)
    result = run_simulation(small, trace, strategy="dynamic")
    assert [s.outcome for s in result.steps] == ["reached"] * len(trace)
    assert all(s.stop_reason is None for s in result.steps)


def test_a_step_the_guest_cannot_reach_records_its_reason() -> None:
    config = parse_machine_config(
        "4G,maxmem=68G",
        ["memory-backend-ram,id=mem0,size=64G,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,block-size=1M"],
        accel="sim",
    )
    trace = scenario("ramp-up", 5 * MiB, MiB, steps=1)  # 5 MiB: the driver plugs 2 MiB units
    (start, step) = run_simulation(config, trace).steps
    assert start.stop_reason is None and step.outcome == "stopped-short"
    assert step.plugged == 4 * MiB and step.stop_reason is not None
    assert step.stop_reason.startswith("the rest (1 MiB) is less than one sub-block")


def test_scenarios_are_bounded_in_time() -> None:
    with pytest.raises(OptionError, match="longer than the longest trace"):
        scenario("ramp-up", GiB, 2 * MiB, steps=10, period=MAX_TRACE_SECONDS)


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


def test_plots_legends_integer_steps_one_colour_per_strategy() -> None:
    import matplotlib.pyplot as plt

    from memslots.simulate.plots import figures

    config = parse_machine_config(
        "4G,maxmem=20G",
        ["memory-backend-ram,id=mem0,size=16G,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"],
        accel="sim",
    )
    trace = scenario("sawtooth", 8 * GiB, 128 * MiB, steps=2)
    results = [run_simulation(config, trace, strategy=s) for s in ("single", "dynamic")]
    figs = figures(results)
    try:
        for ax in figs["memslots"].axes:
            legend = ax.get_legend()
            assert [t.get_text() for t in legend.get_texts()] == ["mapped", "not mapped"]
            for ticks in (ax.get_xticks(), ax.get_yticks()):
                assert all(float(t).is_integer() for t in ticks), ticks
        colours: dict[str, set[str]] = {}
        for name in ("sizes", "metadata"):
            for line in figs[name].axes[0].get_lines():
                label = str(line.get_label())
                for strategy in ("single", "dynamic"):
                    if f"({strategy})" in label or label.startswith(f"{strategy} "):
                        colours.setdefault(strategy, set()).add(str(line.get_color()))
        assert all(len(c) == 1 for c in colours.values()), colours  # the same in every figure
        assert colours["single"] != colours["dynamic"]
        # and the map panel of each strategy is drawn in that colour
        legend_colours = [
            ax.get_legend().get_patches()[0].get_facecolor() for ax in figs["memslots"].axes
        ]
        assert legend_colours[0] != legend_colours[1]
    finally:
        for fig in figs.values():
            plt.close(fig)
