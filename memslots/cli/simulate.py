"""``memslots simulate``: a resize trace against a machine with the Linux guest model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from memslots.cli.common import (
    accel_option,
    err,
    format_ms,
    machine_options,
    size_option,
    table_console,
    working_set_option,
)
from memslots.options import parse_machine_config
from memslots.simulate.run import SCENARIOS
from memslots.sizes import format_size


@click.command()
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
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--period",
    type=click.FloatRange(min=0),
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
    csv_path: str | None,
    plot_dir: str | None,
) -> None:
    """Run a resize trace against a machine with the Linux guest model; record the cost."""
    from pathlib import Path

    from rich.progress import Progress, TaskID

    from memslots.guest.linux import GuestOptions, Online
    from memslots.options import first_virtio_mem, parse_offsets, parse_strategies, parse_trace
    from memslots.simulate.run import (
        DEFAULT_SIM_DEVICE,
        DEFAULT_SIM_MAX,
        DEFAULT_SIM_MEMORY,
        DEFAULT_SIM_OBJECT,
        run_simulation,
    )
    from memslots.simulate.run import scenario as make_scenario

    if not objects and not devices:
        memory, objects, devices = DEFAULT_SIM_MEMORY, [DEFAULT_SIM_OBJECT], [DEFAULT_SIM_DEVICE]
    strategies = parse_strategies(compare, strategy)
    config = parse_machine_config(memory, objects, devices, accel=accel, chardevs=chardevs)
    dev_id = first_virtio_mem(config)
    if trace_file:
        trace = parse_trace(Path(trace_file).read_text(), source=trace_file)
    else:
        memdev = config.virtio_mem_options(dev_id).memdev
        # An unknown memdev is refused with QEMU's words when the machine is built.
        size = next((b.size for b in config.backends if b.id == memdev), DEFAULT_SIM_MAX)
        top = max_size or min(DEFAULT_SIM_MAX, size)
        trace = make_scenario(scenario, top, 2 << 20, steps=steps, period=period)
    guest_opts = GuestOptions(
        boot_memory_end=0,
        online={"movable": Online.MOVABLE, "kernel": Online.KERNEL}.get(
            guest_online, Online.OFFLINE
        ),
        force_bbm=guest_force_bbm,
        pinned=parse_offsets(guest_pinned),
    )
    results = []
    with Progress(console=err, transient=True) as bar:
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
    if csv_path:
        for r in results:
            path = Path(csv_path)
            if len(results) > 1:
                path = path.with_name(f"{path.stem}-{r.strategy.replace(':', '-')}{path.suffix}")
            r.write_csv(path)
    if plot_dir:
        from memslots.simulate.plots import write_plots

        for p in write_plots(results, Path(plot_dir)):
            err.print(f"wrote {p}", highlight=False)
    if as_json:
        data: dict[str, Any] = (
            results[0].as_dict()
            if len(results) == 1
            else {"strategies": [r.as_dict() for r in results]}
        )
        click.echo(json.dumps(data, indent=2))
        return
    _print_simulation(results)


def _print_simulation(results: Sequence[Any]) -> None:
    from memslots.host.kmem import source_footnote, source_label

    out = table_console()
    for r in results:
        source = r.steps[0].kernel_metadata_source if r.steps else None
        table = Table(
            title=f"{r.strategy}: {r.device['id']} ({format_size(r.device['region_size'])}"
            f", {r.device['memslots']} memslot(s)){' on real KVM' if r.real_kvm else ''}",
            title_justify="left",
        )
        for col in (
            "t (s)",
            "requested",
            "plugged",
            "memslots",
            "requests",
            "creates/deletes",
            "KVM metadata",
            f"measured ({source_label(source)})",
            "unmap cost",
            "outcome",
        ):
            table.add_column(col, justify="right")
        for s in r.steps:
            table.add_row(
                f"{s.time:g}",
                format_size(s.requested),
                format_size(s.plugged),
                str(s.memslots_mapped),
                str(sum(s.requests.values())),
                f"{s.memslot_creates}/{s.memslot_deletes}",
                format_size(s.kernel_metadata_bytes),
                format_size(s.kernel_metadata_measured)
                if s.kernel_metadata_measured is not None
                else "-",
                format_ms(s.unmap_cost_ms) if s.memslot_deletes else "-",
                s.outcome,
            )
        out.print(table)
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
                )
            )
        if r.violations:
            out.print(f"[red]guest saw {len(r.violations)} violation(s):[/red] {r.violations[0]}")
    _print_summary(out, results)


def _print_summary(out: Console, results: Sequence[Any]) -> None:
    """Metadata and unmap cost side by side, one row per strategy."""
    first = results[0].summary()
    table = Table(
        title="Kernel metadata vs unmap cost (KVM slot-zap-all "
        f"{'on' if first['slot_zap_all'] else 'off'}, guest working set "
        f"{first['working_set_frames']} frames)",
        title_justify="left",
    )
    for col in (
        "strategy",
        "creates",
        "deletes",
        "metadata peak",
        "metadata x time",
        "unmap cost (model)",
        "per delete",
        "delete CPU time (measured)",
    ):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for r in results:
        sm = r.summary()
        measured = sm["delete_ms_measured"]
        table.add_row(
            r.strategy,
            str(sm["memslot_creates"]),
            str(sm["memslot_deletes"]),
            format_size(sm["kernel_metadata_peak_bytes"]),
            f"{sm['kernel_metadata_byte_seconds'] / (1 << 30):.3g} GiB*s",
            format_ms(sm["unmap_cost_ms"]),
            format_ms(sm["unmap_cost_ms_per_delete"]) if sm["memslot_deletes"] else "-",
            format_ms(measured) if measured is not None else "-",
        )
    out.print(table)
