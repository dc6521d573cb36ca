"""``memslots demo``: a 1 TiB virtio-mem device grown and shrunk, with what it costs."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import DeviceError
from memslots.host.kmem import source_footnote, source_label
from memslots.kvm.cost import slot_metadata_bytes
from memslots.kvm.host import host_info, open_vm_meter
from memslots.machine.machine import Machine, uses_real_kvm
from memslots.machine.vm import GuestVm
from memslots.memory.address_space import Section
from memslots.options import parse_machine_config
from memslots.sizes import GiB, column_unit, format_in, format_size

DEMO_MEMORY = "4G,maxmem=1028G"
DEMO_OBJECT = "memory-backend-ram,id=mem0,size=1T,reserve=off"
DEMO_DEVICE = "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"
#: requested-size at each step: grow to 256 GiB, then back to nothing.
DEMO_STEPS = (0, 1 * GiB, 16 * GiB, 64 * GiB, 256 * GiB, 16 * GiB, 0)


@dataclass(frozen=True)
class DemoStep:
    """The device after one resize: sizes, memslots, and kernel metadata."""

    requested: int
    plugged: int
    requests: int
    guest_checks: int
    memslots_mapped: int
    kvm_memslots_total: int
    kernel_metadata_model: int
    kernel_metadata_measured: int | None
    single_memslot_model: int
    #: Where the measured figure comes from ("cgroup", "system"; None on the model) and the
    #: model's figure for that source.
    kernel_metadata_source: str | None = None
    kernel_metadata_source_model: int | None = None


def run_demo(accel: str, *, as_json: bool = False, out: Console | None = None) -> list[DemoStep]:
    """Run the demo; print tables (or JSON) and return the steps."""
    out = out or Console()
    config = parse_machine_config(DEMO_MEMORY, [DEMO_OBJECT], [DEMO_DEVICE], accel=accel)
    steps: list[DemoStep] = []
    host = host_info()
    real_kvm = uses_real_kvm(config.accel, host)
    with (
        open_vm_meter() if real_kvm else contextlib.nullcontext() as meter,
        Machine(config, host=host) as machine,
        GuestVm(machine) as gvm,
    ):
        real = machine.vm.is_real
        guest = gvm.guests["vmem0"]
        gvm.settle()
        dev = machine.virtio_mem("vmem0")
        single = slot_metadata_bytes(dev.addr, dev.region_size, machine.mmu)
        dm = machine.device_memory
        assert dm is not None

        def in_device(s: Section) -> bool:
            return dev.addr <= s.gpa < dev.addr + dev.region_size

        if not as_json:
            where = "the real kernel (/dev/kvm)" if real else "the KVM model (no /dev/kvm here)"
            out.print(
                f"[bold]memslots demo[/bold] on {where}\n  -m {DEMO_MEMORY}\n"
                f"  -object {DEMO_OBJECT}\n  -device {DEMO_DEVICE}\n"
                f"vmem0: {format_size(dev.region_size)} at 0x{dev.addr:x}, "
                f"{dev.nb_memslots} memslots of {format_size(dev.memslot_size)}, "
                f"block {format_size(dev.block_size)}; KVM MMU: {machine.mmu.describe()}\n"
                f"guest: the Linux virtio_mem driver model on the virtqueue, "
                f"{format_size(guest.mb_size)} memory blocks; it checks its memory "
                + ("from a real vCPU" if gvm.vcpu is not None else "through guest RAM")
            )
        if not as_json and meter is not None:
            out.print(f"kernel memory: {meter.describe()}", highlight=False)
        baseline = meter.read() if meter is not None else 0
        for target in DEMO_STEPS:
            before = len(guest.log)
            result = gvm.resize("vmem0", target).wait(600)
            if not result.ok:
                raise DeviceError(f"demo: {result.reason}")
            checks = guest.verify()
            if guest.violations:
                raise DeviceError(f"demo: the guest lost memory: {guest.violations[0]}")
            model = machine.kvm.predicted_metadata_bytes(in_device)
            measured = meter.read() - baseline if meter is not None else None
            steps.append(
                DemoStep(
                    requested=target,
                    plugged=dev.size,
                    requests=len(guest.log) - before,
                    guest_checks=checks,
                    memslots_mapped=dev.mapped_memslots,
                    kvm_memslots_total=machine.kvm.used_memslots,
                    kernel_metadata_model=model,
                    kernel_metadata_measured=measured,
                    single_memslot_model=single,
                    kernel_metadata_source=meter.source if meter is not None else None,
                    kernel_metadata_source_model=(
                        machine.kvm.predicted_kernel_bytes(meter.source, in_device)
                        if meter is not None
                        else None
                    ),
                )
            )
        if as_json:
            data: dict[str, object] = {"real_kvm": real, "steps": [asdict(s) for s in steps]}
            if meter is not None:
                data["source"] = meter.source
                data["source_detail"] = meter.describe()
            print(json.dumps(data, indent=2))
            return steps
        _print_steps(out, steps, meter.source if meter is not None else None, dev)
    return steps


def _print_steps(out: Console, steps: list[DemoStep], source: str | None, dev: VirtioMem) -> None:
    real = source is not None
    table = Table(title="Resizing vmem0", title_justify="left")
    # One unit per column, named in its title.
    model = [
        s.kernel_metadata_source_model
        if s.kernel_metadata_source_model is not None
        else s.kernel_metadata_model
        for s in steps
    ]
    size_name, size_unit = column_unit([s.requested for s in steps] + [s.plugged for s in steps])
    meta_name, meta_unit = column_unit(model + [s.kernel_metadata_measured or 0 for s in steps])
    cols = [f"requested ({size_name})", f"plugged ({size_name})", "guest requests"]
    cols += ["memslots mapped", f"KVM metadata, model ({meta_name})"]
    if real:
        cols.append(f"measured, {source_label(source)} ({meta_name})")
    for c in cols:
        table.add_column(c, justify="right")
    for s, m in zip(steps, model, strict=True):
        row = [
            format_in(s.requested, size_unit),
            format_in(s.plugged, size_unit),
            str(s.requests),
            f"{s.memslots_mapped} of {dev.nb_memslots}",
            format_in(m, meta_unit),
        ]
        if real:
            assert s.kernel_metadata_measured is not None
            row.append(format_in(s.kernel_metadata_measured, meta_unit))
        table.add_row(*row)
    out.print(table)
    note = source_footnote(source)
    if note:
        out.print(note, highlight=False)
    single = steps[0].single_memslot_model
    out.print(
        f"With one memslot (dynamic-memslots=off) the kernel would pay "
        f"{format_size(single)} at every step, even with nothing plugged. Only memslots that "
        "hold plugged blocks are mapped here, so the kernel pays for what the guest uses. "
        "'memslots measure' measures the single-memslot baseline on the real kernel."
    )
