"""``memslots plan``, ``measure`` and ``demo``: what memslots cost, decided, measured and shown."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from memslots.cli.common import (
    EXAMPLE_MACHINE,
    IntRange,
    accel_option,
    err,
    example,
    machine_options,
    size_option,
    table_console,
    wide_option,
    working_set_option,
)
from memslots.errors import KvmUnavailableError, OptionError
from memslots.kvm.abi import KVM_MEM_SLOTS_NUM
from memslots.kvm.host import host_info
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.options import parse_machine_config
from memslots.reports import Columns, budget_report, device_plan, to_json, unmap_cost_model
from memslots.sizes import format_size
from memslots.vhost.backend import VHOST_KINDS, VhostBackend, VhostModel


@click.command(epilog=example(f"memslots plan {EXAMPLE_MACHINE[0]}", *EXAMPLE_MACHINE[1:]))
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
    "--vhost-user-max-memslots",
    type=click.IntRange(min=1, max=512),
    default=None,
    help="The memslot limit each -device vhost-user-* back-end reports: plan connects to none "
    "(8 without CONFIGURE_MEM_SLOTS; Debian 12's qemu-storage-daemon: 32).",
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
@wide_option
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
    vhost_user_max_memslots: int | None,
    cpu_vendor: str | None,
    phys_bits: int | None,
    as_json: bool,
    wide: bool,
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
        config,
        vm=vm,
        planned=True,
        vhost=vhost,
        before_devices=describe_host,
        host=host,
        vhost_user_limit=vhost_user_max_memslots,
    )
    with machine:
        machine.kvm.working_set_frames = working_set
        result: dict[str, Any] = {
            "host": host.to_json(),
            "memory_devices": [to_json(device_plan(machine, d)) for d in machine.memory_devices],
            "budget": to_json(budget_report(machine)),
            "unmap_cost_model": to_json(unmap_cost_model(machine)),
            # Also printed on stderr as they happen.
            "warnings": list(machine.budget.warnings),
        }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_plan(result, wide=wide)


def _print_plan(result: dict[str, Any], *, wide: bool = False) -> None:
    out = table_console(wide=wide)
    devs = result["memory_devices"]
    cols = Columns()
    cols.text("id", [str(r["id"]) for r in devs])
    if wide:
        cols.text(
            "type", [r["type"] + (" (dynamic)" if r["dynamic_memslots"] else "") for r in devs]
        )
    cols.text("address", [f"0x{r['address']:x}" for r in devs], right=True)
    cols.sizes("size", [r["region_size"] for r in devs])
    if wide:
        cols.sizes("block", [r["block_size"] or None for r in devs])
    cols.text("memslots", [str(r["memslots"]) for r in devs], right=True)
    cols.sizes("each", [r["memslot_size"] for r in devs])
    if wide:
        cols.sizes("last", [r["last_memslot_size"] for r in devs])
    metadata = [r["kernel_metadata_bytes"] for r in devs]
    cols.sizes("metadata 1 memslot", [md["single_memslot"] for md in metadata])
    cols.sizes("as decided", [md["decided_memslots"] for md in metadata])
    cols.durations("unmap cost", [r["unmap_cost_ms"]["total"] for r in devs])
    table = cols.table("Memory devices")
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


@click.command(epilog=example("memslots measure --device-size 1T --plugged 1G --repeats 3"))
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

    if not host_info().kvm:
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
    layouts = (
        ("single", result.singles, result.single),
        ("dynamic", result.dynamics, result.dynamic),
    )
    cols = Columns()
    cols.text("layout", [name for name, _, _ in layouts])
    cols.text("memslots", [str(s.memslots_mapped) for _, _, s in layouts], right=True)
    cols.sizes(
        f"kernel, {label}: min",
        [min(r.kernel_metadata_bytes for r in runs) for _, runs, _ in layouts],
    )
    cols.sizes("median", [s.kernel_metadata_bytes for _, _, s in layouts])
    cols.sizes("model", [s.predicted_bytes for _, _, s in layouts])
    cols.durations("time: min", [min(r.seconds for r in runs) * 1000 for _, runs, _ in layouts])
    cols.durations("median", [s.seconds * 1000 for _, _, s in layouts])
    out.print(
        cols.table(
            f"{format_size(device_size)} virtio-mem device, {format_size(plugged)} plugged "
            f"(real KVM, {repeats}x each)"
        )
    )
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


@click.command(epilog=example("memslots demo -accel sim"))
@accel_option
@click.option("--json", "as_json", is_flag=True, help="Print the steps as JSON.")
def demo(accel: str, as_json: bool) -> None:
    """4 GiB boot RAM and a 1 TiB virtio-mem device, grown and shrunk: memslots and cost."""
    from memslots.demo import run_demo

    run_demo(accel, as_json=as_json, out=table_console())
