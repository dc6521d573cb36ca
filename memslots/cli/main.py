"""The ``memslots`` command: QEMU-style options, tables for people, ``--json`` for programs."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from memslots.devices.memory_device import MemoryDevice
from memslots.devices.virtio_mem import VirtioMem
from memslots.errors import MemslotsError
from memslots.kvm.cost import DEFAULT_WORKING_SET_FRAMES, UNMAP_COST_MEASURED
from memslots.kvm.host import host_info
from memslots.kvm.model import KvmModel
from memslots.kvm.vm import kvm_available
from memslots.machine.machine import Machine
from memslots.memory.consumer import MemslotConsumer
from memslots.options import VirtioMemOptions, parse_machine_config
from memslots.simulate.run import SCENARIOS
from memslots.sizes import format_size, parse_size
from memslots.vhost.kernel import VHOST_KINDS, VhostModel

F = TypeVar("F", bound=Callable[..., Any])

err = Console(stderr=True)


def table_console() -> Console:
    """Standard output for tables: the terminal's width, or a wide page when piped."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def format_ms(ms: float) -> str:
    """A duration given in milliseconds, for tables: ``0.42 ms``, ``53 ms``, ``1.86 s``."""
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    return f"{ms:.2g} ms" if ms < 10 else f"{ms:.0f} ms"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``memslots: message`` on stderr (never wrapped) and exit with ``code``."""
    click.echo(f"memslots: {message}", err=True)
    sys.exit(code)


class _QemuStyleFormatter(logging.Formatter):
    """``memslots: warning: text``, as QEMU prints its warnings."""

    def format(self, record: logging.LogRecord) -> str:
        return f"memslots: {record.levelname.lower()}: {record.getMessage()}"


def machine_options(f: F) -> F:
    """The QEMU-style options every machine-building command takes."""
    f = click.option(
        "-m",
        "memory",
        metavar="SIZE[,slots=N][,maxmem=SIZE]",
        default="128M",
        show_default=True,
        help="Boot RAM and maximum memory, as QEMU's -m.",
    )(f)
    f = click.option(
        "-object",
        "objects",
        multiple=True,
        metavar="memory-backend-TYPE,id=ID,...",
        help="A memory backend (ram, memfd, file), as QEMU's -object.",
    )(f)
    f = click.option(
        "-device",
        "devices",
        multiple=True,
        metavar="DRIVER,...",
        help="A memory device (virtio-mem, pc-dimm) or a vhost-user device "
        "(vhost-user-blk, vhost-user-fs), as QEMU's -device.",
    )(f)
    f = click.option(
        "-chardev",
        "chardevs",
        multiple=True,
        metavar="socket,id=ID,path=PATH",
        help="A vhost-user back-end's Unix socket, as QEMU's -chardev.",
    )(f)
    return f


accel_option = click.option(
    "-accel",
    "accel",
    default="auto",
    show_default=True,
    metavar="auto|kvm|sim[,slot-zap-all=on|off]",
    help="Real KVM, the model, or KVM when present; slot-zap-all=on keeps KVM's quirk that "
    "makes every memslot delete zap all shadow pages (default off: disabled where offered).",
)

working_set_option = click.option(
    "--working-set",
    "working_set",
    type=click.IntRange(min=0),
    default=DEFAULT_WORKING_SET_FRAMES,
    show_default=True,
    metavar="FRAMES",
    help="Frames (2 MiB guest pages, one 4 KiB page used in each) the guest keeps using, for "
    "the unmap-cost model: with slot-zap-all=on every memslot delete makes it re-fault them.",
)


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except MemslotsError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.group()
@click.version_option(package_name="memslots")
def main() -> None:
    """virtio-mem through many small memslots, mapped only while memory in them is plugged."""
    root = logging.getLogger("memslots")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_QemuStyleFormatter())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# plan


def device_row(machine: Machine, dev: MemoryDevice) -> dict[str, Any]:
    """One entry of ``plan --json``'s ``memory_devices``.

    ``unmap_cost_ms`` is what deleting one of the device's memslots would cost the guest
    (delete plus re-fault, per the model), for the VM's slot-zap-all setting and working set.
    """
    mr = dev.get_memory_region()
    size = mr.size if mr is not None else 0
    single, decided = machine.device_metadata_bytes(dev)
    if isinstance(dev, VirtioMem):
        block: int | None = dev.block_size
        dynamic = dev.dynamic
        memslots = dev.decided_memslots
        memslot_size = dev.memslot_size if dynamic and memslots > 1 else size
        last = dev.last_memslot_size
    else:
        block, dynamic, memslots, memslot_size, last = None, False, 1, size, size
    return {
        "id": dev.id,
        "type": dev.info_type,
        "address": dev.get_addr(),
        "region_size": size,
        "block_size": block,
        "dynamic_memslots": dynamic,
        "memslots": memslots,
        "memslot_size": memslot_size,
        "last_memslot_size": last,
        "kernel_metadata_bytes": {"single_memslot": single, "decided_memslots": decided},
        "unmap_cost_ms": machine.kvm.predicted_unmap_cost(memslot_size).to_json(),
    }


@main.command()
@machine_options
@click.option(
    "--kvm-max-memslots",
    type=click.IntRange(min=1),
    default=None,
    help="KVM_CAP_NR_MEMSLOTS of the host [default: this machine's, else 32764].",
)
@click.option(
    "--kvm-free-memslots",
    type=click.IntRange(min=0),
    default=None,
    help="KVM memslots still free when the first memory device is plugged "
    "[default: all but boot RAM's].",
)
@click.option(
    "--vhost-max-memslots",
    type=click.IntRange(min=1),
    default=None,
    help="Memslot limit of a vhost back-end (none without this flag).",
)
@click.option(
    "--vhost-free-memslots",
    type=click.IntRange(min=0),
    default=None,
    help="vhost memslots still free when the first memory device is plugged.",
)
@click.option(
    "--vhost-kind",
    type=click.Choice(VHOST_KINDS),
    default="kernel",
    show_default=True,
    help="kernel counts all RAM; user counts only fd-backed memory.",
)
@click.option(
    "--cpu-vendor",
    type=click.Choice(("amd", "intel")),
    default=None,
    help="The vCPU's (-cpu host's) vendor: AMD moves RAM above 1 TiB [default: this host's].",
)
@click.option(
    "--phys-bits",
    type=click.IntRange(min=32, max=52),
    default=None,
    help="The vCPU's physical address bits [default: this host's].",
)
@accel_option
@working_set_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(
    memory: str,
    objects: Sequence[str],
    devices: Sequence[str],
    chardevs: Sequence[str],
    accel: str,
    working_set: int,
    kvm_max_memslots: int | None,
    kvm_free_memslots: int | None,
    vhost_max_memslots: int | None,
    vhost_free_memslots: int | None,
    vhost_kind: str,
    cpu_vendor: str | None,
    phys_bits: int | None,
    as_json: bool,
) -> None:
    """Decide memslots as QEMU would, on the KVM model, without touching the kernel.

    ``-accel`` only contributes its properties (slot-zap-all): plan always uses the model.
    """
    if vhost_free_memslots is not None and vhost_max_memslots is None:
        fail("--vhost-free-memslots needs --vhost-max-memslots")
    host = host_info().override(
        cpu_vendor=cpu_vendor, phys_bits=phys_bits, kvm_max_memslots=kvm_max_memslots
    )
    vhost: list[MemslotConsumer] = (
        [VhostModel(f"vhost-{vhost_kind}", vhost_max_memslots, kind=vhost_kind)]
        if vhost_max_memslots is not None
        else []
    )

    def describe_host(m: Machine) -> None:
        if kvm_free_memslots is not None:
            m.set_free_memslots(m.kvm, kvm_free_memslots, "--kvm-free-memslots")
        if vhost and vhost_free_memslots is not None:
            m.set_free_memslots(vhost[0], vhost_free_memslots, "--vhost-free-memslots")

    try:
        config = parse_machine_config(memory, objects, devices, accel=accel, chardevs=chardevs)
        vm = KvmModel(
            max_memslots=host.kvm_max_memslots, mmu=host.mmu, slot_zap_all=config.slot_zap_all
        )
        machine = Machine(
            config,
            vm=vm,
            planned=True,
            vhost=vhost,
            before_devices=describe_host,
            host=host,
        )
    except MemslotsError as exc:
        fail(str(exc))
    with machine:
        machine.kvm.working_set_frames = working_set
        rows = [device_row(machine, d) for d in machine.memory_devices]
        dm = machine.device_memory
        result: dict[str, Any] = {
            "host": host.to_json(),
            "memory_devices": rows,
            "required_memslots": dm.required_memslots if dm else 0,
            "used_memslots": dm.used_memslots if dm else 0,
            "reserved_memslots": dm.reserved_memslots if dm else 0,
            "auto_decision_active": dm.auto_decision if dm else False,
            "device_memory": (
                {"base": dm.base, "size": dm.size, "total_space": dm.total_space} if dm else None
            ),
            "kvm": {
                "max_memslots": machine.kvm.max_memslots,
                "used_memslots": machine.kvm.used_memslots,
                "free_memslots": machine.kvm.free_memslots,
                "mmu": machine.mmu.describe(),
                "slot_zap_all": machine.vm.slot_zap_all,
                "unmap_cost_model": {
                    "working_set_frames": working_set,
                    "constants_measured_on": UNMAP_COST_MEASURED.host,
                },
            },
            "vhost": [
                {
                    "name": v.name,
                    "max_memslots": v.max_memslots,
                    "used_memslots": v.used_memslots,
                    "free_memslots": v.free_memslots,
                }
                for v in machine.vhost.backends
            ],
        }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_plan(result)


def _print_plan(result: dict[str, Any]) -> None:
    out = table_console()
    table = Table(title="Memory devices", title_justify="left")
    for col in (
        "id",
        "type",
        "address",
        "size",
        "block",
        "memslots",
        "memslot size",
        "last",
        "metadata as 1 memslot",
        "as decided",
        "unmap cost",
    ):
        table.add_column(col, justify="right" if col not in ("id", "type") else "left")
    for r in result["memory_devices"]:
        md = r["kernel_metadata_bytes"]
        table.add_row(
            str(r["id"]),
            r["type"] + (" (dynamic)" if r["dynamic_memslots"] else ""),
            f"0x{r['address']:x}",
            format_size(r["region_size"]),
            format_size(r["block_size"]) if r["block_size"] else "-",
            str(r["memslots"]),
            format_size(r["memslot_size"]),
            format_size(r["last_memslot_size"]),
            format_size(md["single_memslot"]),
            format_size(md["decided_memslots"]),
            format_ms(r["unmap_cost_ms"]["total_ms"]),
        )
    out.print(table)
    out.print(
        f"host: {result['host']['cpu_vendor']} vCPU with {result['host']['phys_bits']} "
        "physical address bits"
    )
    kvm = result["kvm"]
    out.print(
        f"memory devices: required {result['required_memslots']}, used "
        f"{result['used_memslots']}, reserved {result['reserved_memslots']} memslots; "
        f"KVM: {kvm['used_memslots']} used, {kvm['free_memslots']} free of "
        f"{kvm['max_memslots']} ({kvm['mmu']})"
    )
    model = kvm["unmap_cost_model"]
    out.print(
        "KVM slot-zap-all: "
        + (
            "on (every memslot delete zaps all shadow pages: the guest re-faults its working set)"
            if kvm["slot_zap_all"]
            else "off (a memslot delete zaps only that memslot's mappings)"
        )
        + "; unmap cost = one memslot delete plus re-fault for a guest using "
        f"{model['working_set_frames']} frames (constants measured on "
        f"{model['constants_measured_on']})"
    )
    for v in result["vhost"]:
        out.print(
            f"{v['name']}: {v['used_memslots']} used, {v['free_memslots']} free of "
            f"{v['max_memslots']}"
        )


# ---------------------------------------------------------------------------------------------
# measure


@main.command()
@click.option(
    "--device-size",
    default="1T",
    show_default=True,
    callback=_size_option,
    help="Size of the virtio-mem device.",
)
@click.option(
    "--plugged",
    default="1G",
    show_default=True,
    callback=_size_option,
    help="How much of it to plug.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def measure(device_size: int, plugged: int, as_json: bool) -> None:
    """Measure on the real kernel: one memslot vs dynamic memslots, VmallocUsed and time."""
    from memslots.measure import compare

    if not kvm_available():
        fail("/dev/kvm is not available: measure needs the real kernel (try 'plan')", 2)
    if plugged > device_size:
        fail(f"--plugged {format_size(plugged)} exceeds --device-size {format_size(device_size)}")
    try:
        with err.status("starting") as status:
            result = compare(
                device_size, plugged, on_phase=lambda p: status.update(f"measuring {p}")
            )
    except MemslotsError as exc:
        fail(str(exc))
    data = result.to_json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    out = table_console()
    table = Table(
        title=f"{format_size(device_size)} virtio-mem device, "
        f"{format_size(plugged)} plugged (real KVM)",
        title_justify="left",
    )
    for col in ("", "memslots mapped", "kernel metadata (measured)", "model", "realize+plug"):
        table.add_column(col, justify="right")
    for name, run in (("single memslot", result.single), ("dynamic memslots", result.dynamic)):
        table.add_row(
            name,
            str(run.memslots_mapped),
            format_size(run.kernel_metadata_bytes),
            format_size(run.predicted_bytes),
            f"{run.seconds * 1000:.1f} ms",
        )
    out.print(table)
    ratios = data["ratios"]
    assert isinstance(ratios, dict)
    if ratios["kernel_metadata"] is not None:
        out.print(
            f"dynamic / single: metadata {ratios['kernel_metadata']:.4f}, "
            f"time {ratios['seconds']:.4f}"
        )


# ---------------------------------------------------------------------------------------------
# simulate


@main.command()
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
    callback=_size_option,
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
    from memslots.simulate.run import (
        DEFAULT_SIM_DEVICE,
        DEFAULT_SIM_MAX,
        DEFAULT_SIM_MEMORY,
        DEFAULT_SIM_OBJECT,
        first_virtio_mem,
        parse_strategy,
        parse_trace,
        run_simulation,
    )
    from memslots.simulate.run import (
        scenario as make_scenario,
    )

    if not objects and not devices:
        memory, objects, devices = DEFAULT_SIM_MEMORY, [DEFAULT_SIM_OBJECT], [DEFAULT_SIM_DEVICE]
    strategies = compare.split(",") if compare else [strategy]
    try:
        for s in strategies:
            parse_strategy(s)
        config = parse_machine_config(memory, objects, devices, accel=accel, chardevs=chardevs)
        dev_id = first_virtio_mem(config)
        if trace_file:
            trace = parse_trace(Path(trace_file).read_text(), source=trace_file)
        else:
            vmem = next(
                d for d in config.devices if isinstance(d, VirtioMemOptions) and d.id == dev_id
            )
            backend = next(b for b in config.backends if b.id == vmem.memdev)
            top = max_size or min(DEFAULT_SIM_MAX, backend.size)
            trace = make_scenario(scenario, top, 2 << 20, steps=steps, period=period)
        guest_opts = GuestOptions(
            boot_memory_end=0,
            online={"movable": Online.MOVABLE, "kernel": Online.KERNEL}.get(
                guest_online, Online.OFFLINE
            ),
            force_bbm=guest_force_bbm,
            pinned=frozenset(parse_size(p) for p in guest_pinned.split(",") if p),
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
                        progress=advance,
                        guest_options=guest_opts,
                        working_set_frames=working_set,
                    )
                )
    except MemslotsError as exc:
        fail(str(exc))
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
    out = table_console()
    for r in results:
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
            "measured",
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


# ---------------------------------------------------------------------------------------------
# run, and the QMP client side


@main.command()
@machine_options
@accel_option
@click.option(
    "-qmp",
    "qmp",
    multiple=True,
    required=True,
    metavar="unix:PATH,server=on,wait=off",
    help="QMP monitor socket (tcp:HOST:PORT only when given explicitly).",
)
@click.option(
    "-guest",
    "guest",
    type=click.Choice(("linux", "none")),
    default="linux",
    show_default=True,
    help="The Linux driver model as guest, or no guest.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve Prometheus metrics on 127.0.0.1:PORT.",
)
def run(
    memory: str,
    objects: Sequence[str],
    devices: Sequence[str],
    chardevs: Sequence[str],
    accel: str,
    qmp: Sequence[str],
    guest: str,
    metrics_port: int | None,
) -> None:
    """Run the machine with a QMP monitor until 'quit', SIGTERM or SIGINT."""
    import asyncio

    from memslots.monitor.runtime import parse_qmp_option, serve

    logging.getLogger("memslots").setLevel(logging.INFO)
    try:
        config = parse_machine_config(memory, objects, devices, accel=accel, chardevs=chardevs)
        endpoints = [parse_qmp_option(q) for q in qmp]
        asyncio.run(serve(config, endpoints, guest=guest == "linux", metrics_port=metrics_port))
    except MemslotsError as exc:
        fail(str(exc))


@main.command("qmp")
@click.argument("socket")
@click.argument("command")
@click.argument("args", nargs=-1)
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True
)
def qmp_command(socket: str, command: str, args: Sequence[str], timeout: float) -> None:
    """Send one QMP COMMAND (ARGS as key=value or one JSON object) and print the reply."""
    from memslots.monitor.client import run_qmp

    sys.exit(run_qmp(socket, command, args, timeout=timeout))


@main.command()
@click.argument("socket")
@click.argument("device")
@click.argument("size")
@click.option("--wait", is_flag=True, help="Wait until the size is reached (progress bar).")
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True
)
def resize(socket: str, device: str, size: str, wait: bool, timeout: float) -> None:
    """Set DEVICE's requested-size to SIZE (exit 2 on timeout, 1 on error)."""
    from memslots.monitor.client import run_resize

    sys.exit(run_resize(socket, device, size, wait=wait, timeout=timeout))


@main.command()
@click.argument("socket")
@click.argument("what", type=click.Choice(("memslots", "memory-devices", "budget")))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def info(socket: str, what: str, as_json: bool) -> None:
    """Show the memslot map, the memory devices or the memslot budget of a running machine."""
    from memslots.monitor.client import run_info

    sys.exit(run_info(socket, what, json_output=as_json))


# ---------------------------------------------------------------------------------------------
# demo


@main.command()
@accel_option
@click.option("--json", "as_json", is_flag=True, help="Print the steps as JSON.")
def demo(accel: str, as_json: bool) -> None:
    """4 GiB boot RAM and a 1 TiB virtio-mem device, grown and shrunk: memslots and cost."""
    from memslots.demo import run_demo

    try:
        run_demo(accel, as_json=as_json, out=table_console())
    except MemslotsError as exc:
        fail(str(exc))


if __name__ == "__main__":  # pragma: no cover
    main()
