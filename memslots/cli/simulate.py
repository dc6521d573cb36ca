"""``memslots simulate``: a resize trace against a machine with the Linux guest model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from memslots.cli.common import (
    FloatRange,
    IntRange,
    accel_option,
    check_output_path,
    err,
    example,
    machine_options,
    size_option,
    table_console,
    wide_option,
    working_set_option,
)
from memslots.errors import OptionError
from memslots.options import MAX_TRACE_SECONDS, parse_machine_config
from memslots.reports import Columns
from memslots.simulate.run import MAX_SCENARIO_STEPS, SCENARIOS
from memslots.sizes import format_size


@click.command(
    epilog=example(
        "memslots simulate -accel sim --scenario sawtooth \\",
        "    --compare single,dynamic,fixed:1G",
    )
)
@machine_options
@accel_option
@click.option(
    "--trace",
    "trace_file",
    type=click.Path(exists=True, dir_okay=False),
    help="CSV of time,requested-size rows.",
)
@click.option(
    "--scenario",
    type=click.Choice(SCENARIOS),
    default="ramp-up",
    show_default=True,
    help="A built-in trace (when no --trace is given).",
)
@click.option(
    "--max-size",
    default=None,
    callback=size_option,
    help="Largest size of the built-in scenario [default: 64G or the device size].",
)
@click.option(
    "--steps",
    type=IntRange(min=1, max=MAX_SCENARIO_STEPS),
    default=8,
    show_default=True,
    help="Steps of the built-in scenario (ramp-up; sawtooth: per half).",
)
@click.option(
    "--period",
    type=FloatRange(min=0, max=MAX_TRACE_SECONDS),
    default=60.0,
    show_default=True,
    help="Seconds between scenario steps.",
)
@click.option(
    "--strategy",
    default="dynamic",
    show_default=True,
    help="single | dynamic | fixed:SIZE (overrides the device's option).",
)
@click.option("--compare", default=None, help="Comma-separated strategies to run side by side.")
@click.option("--request-log", is_flag=True, help="Include every guest request in the JSON.")
@click.option(
    "--memslot-map",
    is_flag=True,
    help="Include each step's map of mapped memslots in the JSON (--plots implies it).",
)
@click.option(
    "--guest-online",
    type=click.Choice(("movable", "kernel", "offline")),
    default="movable",
    show_default=True,
    help="The guest's auto-online policy for hot-added memory.",
)
@click.option("--guest-force-bbm", is_flag=True, help="The guest's force_bbm=1.")
@working_set_option
@click.option(
    "--guest-pinned",
    default="",
    metavar="OFFSET[,OFFSET…]",
    help="Sub-blocks (offsets from the device start) that unmovable pages pin in kernel zones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@wide_option
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write steps as CSV.")
@click.option(
    "--plots",
    "plot_dir",
    type=click.Path(file_okay=False),
    help="Write PNG and SVG plots into this directory.",
)
def simulate(
    memory: str,
    objects: Sequence[str],
    devices: Sequence[str],
    chardevs: Sequence[str],
    accel: str,
    trace_file: str | None,
    scenario: str,
    max_size: int | None,
    steps: int,
    period: float,
    strategy: str,
    compare: str | None,
    request_log: bool,
    memslot_map: bool,
    guest_online: str,
    guest_force_bbm: bool,
    working_set: int,
    guest_pinned: str,
    as_json: bool,
    wide: bool,
    csv_path: str | None,
    plot_dir: str | None,
) -> None:
    """Run a resize trace against a machine with the Linux guest model; record the cost."""
    from rich.progress import Progress, TaskID

    from memslots.guest.linux import GuestOptions, Online
    from memslots.options import first_virtio_mem, load_trace, parse_offsets, parse_strategies
    from memslots.simulate.run import (
        DEFAULT_SIM_DEVICE,
        DEFAULT_SIM_MAX,
        DEFAULT_SIM_MEMORY,
        DEFAULT_SIM_OBJECT,
        run_simulation,
        scenario_granule,
    )
    from memslots.simulate.run import scenario as make_scenario

    # Everything that can refuse does so before the simulation runs, so no result is lost.
    if csv_path is not None:
        check_output_path("--csv", Path(csv_path), directory=False)
    if plot_dir is not None:
        from memslots.simulate.plots import require_matplotlib

        check_output_path("--plots", Path(plot_dir), directory=True)
        require_matplotlib()
    if not objects and not devices:
        memory, objects, devices = DEFAULT_SIM_MEMORY, [DEFAULT_SIM_OBJECT], [DEFAULT_SIM_DEVICE]
    strategies = parse_strategies(compare, strategy)
    config = parse_machine_config(memory, objects, devices, accel=accel, chardevs=chardevs)
    dev_id = first_virtio_mem(config)
    if trace_file:
        trace = load_trace(trace_file)
    else:
        memdev = config.virtio_mem_options(dev_id).memdev
        # An unknown memdev is refused with QEMU's words when the machine is built.
        size = next((b.size for b in config.backends if b.id == memdev), DEFAULT_SIM_MAX)
        top = max_size or min(DEFAULT_SIM_MAX, size)
        granule = scenario_granule(config, dev_id)
        trace = make_scenario(scenario, top, granule, steps=steps, period=period)
    guest_opts = GuestOptions(
        boot_memory_end=0,
        online={"movable": Online.MOVABLE, "kernel": Online.KERNEL}.get(
            guest_online, Online.OFFLINE
        ),
        force_bbm=guest_force_bbm,
        pinned=parse_offsets(guest_pinned),
    )
    results = []
    # Progress is for a person watching: none in a pipe or a log.
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        for s in strategies:
            task = bar.add_task(f"simulating ({s})", total=len(trace))

            def advance(n: int, task: TaskID = task) -> None:
                bar.update(task, completed=n)

            results.append(
                run_simulation(
                    config,
                    trace,
                    strategy=s,
                    request_log=request_log,
                    memslot_maps=memslot_map or plot_dir is not None,
                    progress=advance,
                    guest_options=guest_opts,
                    working_set_frames=working_set,
                )
            )
    if as_json:
        data: dict[str, Any] = (
            results[0].as_dict()
            if len(results) == 1
            else {"strategies": [r.as_dict() for r in results]}
        )
        click.echo(json.dumps(data, indent=2))
    else:
        _print_simulation(results, wide=wide)
    # Files last: if one cannot be written after all, the results are already shown.
    try:
        if csv_path:
            for r in results:
                path = Path(csv_path)
                if len(results) > 1:
                    name = f"{path.stem}-{r.strategy.replace(':', '-')}{path.suffix}"
                    path = path.with_name(name)
                r.write_csv(path)
        if plot_dir:
            from memslots.simulate.plots import write_plots

            for p in write_plots(results, Path(plot_dir)):
                err.print(f"wrote {p}", highlight=False)
    except OSError as exc:
        raise OptionError(f"cannot write {exc.filename}: {exc.strerror or exc}") from exc


def _print_simulation(results: Sequence[Any], *, wide: bool = False) -> None:
    from memslots.host.kmem import source_footnote, source_label

    out = table_console(wide=wide)
    for r in results:
        steps = r.steps
        source = steps[0].kernel_metadata_source if steps else None
        cols = Columns()
        cols.text("t (s)", [f"{s.time:g}" for s in steps], right=True)
        cols.sizes("requested", [s.requested for s in steps])
        cols.sizes("plugged", [s.plugged for s in steps])
        cols.text("memslots", [str(s.memslots_mapped) for s in steps], right=True)
        if wide:
            cols.text("requests", [str(sum(s.requests.values())) for s in steps], right=True)
        cols.text(
            "creates/ deletes",
            [f"{s.memslot_creates}/{s.memslot_deletes}" for s in steps],
            right=True,
        )
        cols.sizes("KVM metadata", [s.kernel_metadata_bytes for s in steps])
        if wide or any(s.kernel_metadata_measured is not None for s in steps):
            cols.sizes(
                f"measured, {source_label(source)}", [s.kernel_metadata_measured for s in steps]
            )
        cols.durations(
            "unmap cost", [s.unmap_cost_ms if s.memslot_deletes else None for s in steps]
        )
        if wide:
            cols.text("outcome", [s.outcome for s in steps])
        out.print(
            cols.table(
                f"{r.strategy}: {r.device['id']} ({format_size(r.device['region_size'])}, "
                f"{r.device['memslots']} memslot(s)){' on real KVM' if r.real_kvm else ''}"
            )
        )
        for s in (s for s in steps if s.outcome != "reached"):
            # The guest's own words for why it stopped short of the request.
            out.print(
                f"t={s.time:g}s: plugged {format_size(s.plugged)} of "
                f"{format_size(s.requested)} requested: {s.stop_reason or s.outcome}",
                highlight=False,
            )
        note = source_footnote(source)
        if note:
            out.print(note, highlight=False)
        lat = r.latency_summary()
        if lat:
            out.print(
                "request round trips (µs): "
                + ", ".join(
                    f"{k} p50 {v['p50']:.1f} p99 {v['p99']:.1f} (n={int(v['count'])})"
                    for k, v in lat.items()
                ),
                highlight=False,
            )
        if r.violations:
            out.print(f"[red]guest saw {len(r.violations)} violation(s):[/red] {r.violations[0]}")
    _print_summary(out, results, wide=wide)


def _print_summary(out: Console, results: Sequence[Any], *, wide: bool) -> None:
    """Metadata and unmap cost side by side, one row per strategy."""
    summaries = [r.summary() for r in results]
    first = summaries[0]
    cols = Columns()
    cols.text("strategy", [r.strategy for r in results])
    cols.text("creates", [str(sm["memslot_creates"]) for sm in summaries], right=True)
    cols.text("deletes", [str(sm["memslot_deletes"]) for sm in summaries], right=True)
    cols.sizes("metadata peak", [sm["kernel_metadata_peak_bytes"] for sm in summaries])
    cols.text(
        "metadata x time (GiB*s)",
        [f"{sm['kernel_metadata_byte_seconds'] / (1 << 30):.3g}" for sm in summaries],
        right=True,
    )
    cols.durations("unmap cost", [sm["unmap_cost_ms"] for sm in summaries])
    cols.durations(
        "per delete",
        [sm["unmap_cost_ms_per_delete"] if sm["memslot_deletes"] else None for sm in summaries],
    )
    if wide or any(sm["delete_ms_measured"] is not None for sm in summaries):
        cols.durations("delete CPU time", [sm["delete_ms_measured"] for sm in summaries])
    out.print(
        cols.table(
            "Kernel metadata vs unmap cost (model; KVM slot-zap-all "
            f"{'on' if first['slot_zap_all'] else 'off'}, guest working set "
            f"{first['working_set_frames']} frames)"
        )
    )
