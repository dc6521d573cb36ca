"""``memslots plan``, ``measure`` and ``demo``: what memslots cost, decided, measured and shown."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
from rich.table import Table

from memslots.cli.common import (
    IntRange,
    accel_option,
    err,
    format_ms,
    machine_options,
    size_option,
    table_console,
    working_set_option,
)
from memslots.errors import KvmUnavailableError, OptionError
from memslots.kvm.abi import KVM_MEM_SLOTS_NUM
from memslots.kvm.host import host_info
from memslots.kvm.model import KvmModel
from memslots.kvm.vm import kvm_available
from memslots.machine.machine import Machine
from memslots.options import parse_machine_config
from memslots.reports import budget_report, device_plan, to_json, unmap_cost_model
from memslots.sizes import format_size
from memslots.vhost.backend import VHOST_KINDS, VhostBackend, VhostModel


@click.command()
@machine_options
@click.option(
    "--kvm-max-memslots",
    # KVM's slot ids are shorts: no kernel reports more (x86 keeps 3 for itself: 32764).
    type=IntRange(min=1, max=KVM_MEM_SLOTS_NUM),
    default=None,
    help="KVM_CAP_NR_MEMSLOTS of the host [default: this machine's, else 32764].",
)
@click.option(
    "--kvm-free-memslots",
    type=IntRange(min=0),
    default=None,
    help="KVM memslots still free when the first memory device is plugged "
    "[default: all but boot RAM's].",
)
@click.option(
    "--vhost-max-memslots",
    type=IntRange(min=1),
    default=None,
    help="Memslot limit of a vhost back-end (none without this flag).",
)
@click.option(
    "--vhost-free-memslots",
    type=IntRange(min=0),
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
    type=IntRange(min=32, max=52),
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
        raise OptionError("--vhost-free-memslots needs --vhost-max-memslots")
    host = host_info().override(
        cpu_vendor=cpu_vendor, phys_bits=phys_bits, kvm_max_memslots=kvm_max_memslots
    )
    vhost: list[VhostBackend] = (
        [VhostModel(f"vhost-{vhost_kind}", vhost_max_memslots, kind=vhost_kind)]
        if vhost_max_memslots is not None
        else []
    )

    def describe_host(m: Machine) -> None:
        if kvm_free_memslots is not None:
            m.set_free_memslots(m.kvm, kvm_free_memslots, "--kvm-free-memslots")
        if vhost and vhost_free_memslots is not None:
            m.set_free_memslots(vhost[0], vhost_free_memslots, "--vhost-free-memslots")

    config = parse_machine_config(memory, objects, devices, accel=accel, chardevs=chardevs)
    vm = KvmModel(
        max_memslots=host.kvm_max_memslots, mmu=host.mmu, slot_zap_all=config.slot_zap_all
    )
    machine = Machine(
        config, vm=vm, planned=True, vhost=vhost, before_devices=describe_host, host=host
    )
    with machine:
        machine.kvm.working_set_frames = working_set
        result: dict[str, Any] = {
            "host": host.to_json(),
            "memory_devices": [to_json(device_plan(machine, d)) for d in machine.memory_devices],
            "budget": to_json(budget_report(machine)),
            "unmap_cost_model": to_json(unmap_cost_model(machine)),
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
            format_ms(r["unmap_cost_ms"]["total"]),
        )
    out.print(table)
    host = result["host"]
    out.print(f"host: {host['cpu_vendor']} vCPU with {host['phys_bits']} physical address bits")
    budget = result["budget"]
    dm = budget["device_memory"] or {}
    kvm, *vhost = budget["consumers"]
    out.print(
        f"memory devices: required {dm.get('required_memslots', 0)}, used "
        f"{dm.get('used_memslots', 0)}, reserved {dm.get('reserved_memslots', 0)} memslots; "
        f"KVM: {kvm['used_memslots']} used, {kvm['free_memslots']} free of "
        f"{kvm['max_memslots']} ({host['mmu']})"
    )
    model = result["unmap_cost_model"]
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
    for v in vhost:
        out.print(
            f"{v['name']}: {v['used_memslots']} used, {v['free_memslots']} free of "
            f"{v['max_memslots']}"
        )


@click.command()
@click.option(
    "--device-size",
    default="1T",
    show_default=True,
    callback=size_option,
    help="Size of the virtio-mem device.",
)
@click.option(
    "--plugged",
    default="1G",
    show_default=True,
    callback=size_option,
    help="How much of it to plug.",
)
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    type=IntRange(min=1, max=100),
    help="Measure each layout this often; pairs alternate which goes first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def measure(device_size: int, plugged: int, repeats: int, as_json: bool) -> None:
    """Measure on the real kernel: one memslot vs dynamic memslots, kernel memory and time.

    Kernel memory is measured per VM in a memory cgroup of our own where one can be created,
    else as the system-wide VmallocUsed (marked: other processes move it too).
    """
    from memslots.host.kmem import source_footnote, source_label
    from memslots.measure import compare

    if not kvm_available():
        raise KvmUnavailableError(
            "/dev/kvm is not available: measure needs the real kernel (try 'plan')"
        )
    if plugged > device_size:
        raise OptionError(
            f"--plugged {format_size(plugged)} exceeds --device-size {format_size(device_size)}"
        )
    with err.status("starting") as status:
        result = compare(
            device_size,
            plugged,
            repeats=repeats,
            on_phase=lambda p: status.update(f"measuring {p}"),
        )
    data = result.to_json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    out = table_console()
    label = source_label(result.source)
    table = Table(
        title=f"{format_size(device_size)} virtio-mem device, "
        f"{format_size(plugged)} plugged (real KVM, {repeats}x each)",
        title_justify="left",
    )
    for col in ("", "memslots", f"kernel ({label})\nmin / median", "model", "time\nmin / median"):
        table.add_column(col, justify="right")
    for name, runs in (("single", result.singles), ("dynamic", result.dynamics)):
        summary = result.single if name == "single" else result.dynamic
        kernel = [r.kernel_metadata_bytes for r in runs]
        seconds = [r.seconds for r in runs]
        table.add_row(
            name,
            str(summary.memslots_mapped),
            f"{format_size(min(kernel))} / {format_size(summary.kernel_metadata_bytes)}",
            format_size(summary.predicted_bytes),
            f"{min(seconds) * 1000:.1f} / {summary.seconds * 1000:.1f} ms",
        )
    out.print(table)
    out.print(f"kernel memory: {result.source_detail}", highlight=False)
    note = source_footnote(result.source)
    if note:
        out.print(note, highlight=False)
    ratios = data["ratios"]
    assert isinstance(ratios, dict)
    if ratios["kernel_metadata"] is not None:
        out.print(
            f"dynamic / single (medians): kernel {ratios['kernel_metadata']:.4f}, "
            f"time {ratios['seconds']:.4f}"
        )


@click.command()
@accel_option
@click.option("--json", "as_json", is_flag=True, help="Print the steps as JSON.")
def demo(accel: str, as_json: bool) -> None:
    """4 GiB boot RAM and a 1 TiB virtio-mem device, grown and shrunk: memslots and cost."""
    from memslots.demo import run_demo

    run_demo(accel, as_json=as_json, out=table_console())
