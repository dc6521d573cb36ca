"""``memslots simulate``: run a resize trace against a machine and record what it costs.

A trace is a list of ``(time, requested-size)`` steps, from a CSV file or a built-in scenario.
At each step the requested size is set as a :class:`~memslots.machine.resize.ResizeJob` and the
guest (the Linux driver model, talking to the device through the virtqueue) runs until the next
step. Every step records the requested and plugged sizes, the memslots mapped, the requests by type
(and, if asked, each request), memslot operations, the kernel metadata the model predicts and,
on the real kernel, what the per-VM kernel-memory meter says (:mod:`memslots.host.kmem`: a
memory cgroup of our own, else the system-wide VmallocUsed), with its source. ``compare`` runs
the same trace once per exposure strategy: one memslot, QEMU's dynamic memslots, or fixed-size
memslots.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import OptionError
from memslots.guest.linux import GuestOptions, LinuxGuest
from memslots.guest.sched import Scheduler
from memslots.host.kmem import KmemMeter, SystemMeter, current_meter
from memslots.kvm.abi import VmBackend
from memslots.kvm.cost import slot_metadata_bytes
from memslots.kvm.host import open_vm_meter
from memslots.machine.machine import Machine, create_vm, uses_real_kvm
from memslots.machine.resize import ResizeJob
from memslots.machine.vm import GuestVm, ObservedChannel
from memslots.memory.address_space import Section
from memslots.options import MachineConfig, TraceStep, first_virtio_mem, with_strategy
from memslots.reports import device_plan, to_json
from memslots.sizes import GiB

# -- traces ------------------------------------------------------------------------------------


SCENARIOS = ("ramp-up", "sawtooth", "burst")


def scenario(
    name: str, max_size: int, block: int, *, steps: int = 8, period: float = 60.0
) -> list[TraceStep]:
    """Built-in traces up to ``max_size``: ramp-up, sawtooth (up and down twice), burst."""

    def at(fraction: float) -> int:
        return int(max_size * fraction) // block * block

    if name == "ramp-up":
        sizes = [at(i / steps) for i in range(steps + 1)]
    elif name == "sawtooth":
        up = [at(i / (steps // 2)) for i in range(steps // 2 + 1)]
        sizes = (up + up[-2:0:-1]) * 2 + [0]
    elif name == "burst":
        sizes = [at(1 / 16), at(1 / 16), at(1.0), at(1.0), at(1 / 16), at(1 / 16), at(0.5), 0]
    else:
        raise OptionError(f"unknown scenario '{name}' (known: {', '.join(SCENARIOS)})")
    return [TraceStep(i * period, s) for i, s in enumerate(sizes)]


# -- recording ---------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """What one trace step did."""

    time: float
    requested: int
    plugged: int
    memslots_mapped: int
    requests: dict[str, int]
    responses: dict[str, int]
    memslot_creates: int
    memslot_deletes: int
    kernel_metadata_bytes: int
    kernel_metadata_measured: int | None
    ideal_metadata_bytes: int
    single_metadata_bytes: int
    outcome: str
    memslot_map: list[bool]
    request_log: list[dict[str, object]] | None = None
    #: Where ``kernel_metadata_measured`` comes from: "cgroup", "system" (may include other
    #: processes), or None on the model.
    kernel_metadata_source: str | None = None
    #: The model's figure for that source (memcg-charged or VmallocUsed bytes).
    kernel_metadata_source_model: int | None = None

    def as_dict(self) -> dict[str, object]:
        """The JSON shape of a step."""
        d = dataclasses.asdict(self)
        if self.request_log is None:
            d.pop("request_log")
        return d


@dataclass
class SimResult:
    """A whole run: the steps, request latencies and the violations the guest saw."""

    strategy: str
    real_kvm: bool
    device: dict[str, object]
    steps: list[StepRecord] = field(default_factory=list)
    latencies_us: dict[str, list[float]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def latency_summary(self) -> dict[str, dict[str, float]]:
        """p50/p99 (µs) of request round trips through the virtqueue, per request type."""
        out = {}
        for kind, values in sorted(self.latencies_us.items()):
            vs = sorted(values)
            out[kind] = {
                "count": float(len(vs)),
                "p50": statistics.median(vs),
                "p99": vs[min(len(vs) - 1, int(len(vs) * 0.99))],
            }
        return out

    def as_dict(self) -> dict[str, object]:
        """The ``simulate --json`` object for one strategy."""
        return {
            "strategy": self.strategy,
            "real_kvm": self.real_kvm,
            "device": self.device,
            "steps": [s.as_dict() for s in self.steps],
            "latency_us": self.latency_summary(),
            "violations": self.violations,
        }

    def write_csv(self, path: Path) -> None:
        """One row per step."""
        cols = [
            "time",
            "requested",
            "plugged",
            "memslots_mapped",
            "memslot_creates",
            "memslot_deletes",
            "kernel_metadata_bytes",
            "kernel_metadata_measured",
            "kernel_metadata_source",
            "ideal_metadata_bytes",
            "single_metadata_bytes",
            "outcome",
        ]
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*cols, "plug", "unplug", "unplug_all", "state"])
            for s in self.steps:
                d = s.as_dict()
                w.writerow(
                    [d[c] for c in cols]
                    + [s.requests.get(k, 0) for k in ("plug", "unplug", "unplug_all", "state")]
                )


#: The device plan's fields a simulation result repeats.
DEVICE_FIELDS = ("id", "address", "region_size", "block_size", "memslots", "memslot_size")


def _ideal_metadata(dev: VirtioMem, machine: Machine) -> int:
    """Metadata if exactly the plugged ranges were memslots (the unreachable ideal)."""
    total = 0
    bs = dev.block_size
    bitmap = dev.bitmap
    i = bitmap.find(1)
    while i >= 0:
        j = bitmap.find(0, i)
        j = len(bitmap) if j < 0 else j
        total += slot_metadata_bytes(dev.addr + i * bs, (j - i) * bs, machine.mmu)
        i = bitmap.find(1, j) if j < len(bitmap) else -1
    return total


def run_trace(
    machine: Machine,
    dev: VirtioMem,
    guest: LinuxGuest,
    sched: Scheduler,
    trace: Sequence[TraceStep],
    *,
    strategy: str,
    latencies: dict[str, list[float]],
    request_log: bool = False,
    progress: Callable[[int], None] | None = None,
    meter: KmemMeter | None = None,
) -> SimResult:
    """Run ``trace`` on a booted guest; one :class:`StepRecord` per step.

    On the real kernel the measured figure comes from ``meter``, which should have been opened
    before the VM was created (:func:`run_simulation` does); without one the innermost open
    meter of the process is used, else the system-wide VmallocUsed.
    """
    real = machine.vm.is_real
    with contextlib.ExitStack() as stack:
        if real and meter is None:
            meter = current_meter() or stack.enter_context(
                SystemMeter("no meter was opened before the VM")
            )
        return _run_trace(
            machine,
            dev,
            guest,
            sched,
            trace,
            strategy=strategy,
            latencies=latencies,
            request_log=request_log,
            progress=progress,
            meter=meter if real else None,
        )


def _run_trace(
    machine: Machine,
    dev: VirtioMem,
    guest: LinuxGuest,
    sched: Scheduler,
    trace: Sequence[TraceStep],
    *,
    strategy: str,
    latencies: dict[str, list[float]],
    request_log: bool,
    progress: Callable[[int], None] | None,
    meter: KmemMeter | None,
) -> SimResult:
    real = meter is not None
    plan = to_json(device_plan(machine, dev))
    result = SimResult(
        strategy=strategy,
        real_kvm=real,
        device={k: plan[k] for k in DEVICE_FIELDS},
        latencies_us=latencies,
    )

    def in_dev(s: Section) -> bool:
        return dev.addr <= s.gpa < dev.addr + dev.region_size

    single = slot_metadata_bytes(dev.addr, dev.region_size, machine.mmu)
    source = meter.source if meter is not None else None

    def source_model() -> int | None:
        return machine.kvm.predicted_kernel_bytes(source, in_dev) if source else None

    # The device's memslots so far were created inside the meter too; count them as the model
    # does, so the figure is the device's own (boot RAM and the VM itself are not in it).
    baseline = meter.read() - (source_model() or 0) if meter is not None else 0
    for i, step in enumerate(trace):
        sched.run_until(lambda: False, step.time)
        log_start = len(guest.log)
        creates, deletes = machine.kvm.creates, machine.kvm.deletes
        job = ResizeJob(dev, step.requested, sched, guest)
        horizon = trace[i + 1].time if i + 1 < len(trace) else step.time + 3600
        res = job.wait(max(0.0, horizon - sched.now()))
        new = guest.log[log_start:]
        record = StepRecord(
            time=step.time,
            requested=step.requested,
            plugged=dev.size,
            memslots_mapped=dev.mapped_memslots,
            requests=dict(Counter(r.type for r in new)),
            responses=dict(Counter(r.response for r in new)),
            memslot_creates=machine.kvm.creates - creates,
            memslot_deletes=machine.kvm.deletes - deletes,
            kernel_metadata_bytes=machine.kvm.predicted_metadata_bytes(in_dev),
            kernel_metadata_measured=meter.read() - baseline if meter is not None else None,
            ideal_metadata_bytes=_ideal_metadata(dev, machine),
            single_metadata_bytes=single,
            outcome=res.outcome.value,
            memslot_map=[m.mapped for m in dev.memslot_map()],
            request_log=[r.as_dict() for r in new] if request_log else None,
            kernel_metadata_source=source,
            kernel_metadata_source_model=source_model(),
        )
        result.steps.append(record)
        guest.verify()
        if progress:
            progress(i + 1)
    result.violations = list(guest.violations)
    return result


def run_simulation(
    config: MachineConfig,
    trace: Sequence[TraceStep],
    *,
    strategy: str = "dynamic",
    request_log: bool = False,
    progress: Callable[[int], None] | None = None,
    vm_factory: Callable[[], VmBackend] | None = None,
    guest_options: GuestOptions | None = None,
) -> SimResult:
    """Build the machine for ``strategy``, boot the guest, run ``trace``, tear it all down."""
    dev_id = first_virtio_mem(config)
    config = with_strategy(config, dev_id, strategy)
    real = vm_factory is not None or uses_real_kvm(config.accel)
    # The meter is opened before the VM exists, so that everything the VM costs is in it.
    with (
        open_vm_meter() if real else contextlib.nullcontext() as meter,
        Machine(
            config, vm=vm_factory() if vm_factory is not None else create_vm(config.accel)
        ) as machine,
    ):
        latencies: dict[str, list[float]] = {}
        sched = Scheduler()
        with GuestVm(machine, sched, guest_options=guest_options) as gvm:
            guest = gvm.guests[dev_id]

            def observe(kind: str, seconds: float) -> None:
                latencies.setdefault(kind, []).append(seconds * 1e6)

            guest.channel = ObservedChannel(guest.channel, observe)
            gvm.settle()
            return run_trace(
                machine,
                machine.virtio_mem(dev_id),
                guest,
                sched,
                trace,
                strategy=strategy,
                latencies=latencies,
                request_log=request_log,
                progress=progress,
                meter=meter,
            )


DEFAULT_SIM_MEMORY = "4G,maxmem=260G"
DEFAULT_SIM_OBJECT = "memory-backend-ram,id=mem0,size=256G,reserve=off"
DEFAULT_SIM_DEVICE = "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"
DEFAULT_SIM_MAX = 64 * GiB
