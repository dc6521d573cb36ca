"""``memslots simulate``: run a resize trace against a machine and record what it costs.

A trace is a list of ``(time, requested-size)`` steps, from a CSV file or a built-in scenario.
At each step the requested size is set as a :class:`~memslots.machine.resize.ResizeJob` and the
guest (the Linux driver model, talking to the device through the virtqueue) runs until the next
step. Every step records the requested and plugged sizes, the memslots mapped, the requests by type
(and, if asked, each request), memslot operations, the kernel metadata the model predicts and,
on the real kernel, what the per-VM kernel-memory meter says (:mod:`memslots.host.kmem`: a
memory cgroup of our own, else the system-wide VmallocUsed), with its source, and what the
memslot deletes cost the guest (:func:`memslots.kvm.cost.unmap_cost`: the delete plus, with
KVM's SLOT_ZAP_ALL quirk, the re-fault of the guest's working set; on the real kernel also the
deletes' measured CPU time). ``compare`` runs the same trace once per exposure strategy: one
memslot, QEMU's dynamic memslots, or fixed-size memslots; :meth:`SimResult.summary` puts
metadata and unmap cost side by side, since the memslot size trades one against the other.
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
from memslots.guest.linux import GuestOptions, LinuxGuest, memory_block_size
from memslots.guest.sched import Scheduler
from memslots.host.kmem import KmemMeter, SystemMeter, current_meter
from memslots.kvm.abi import VmBackend
from memslots.kvm.cost import DEFAULT_WORKING_SET_FRAMES, slot_metadata_bytes
from memslots.kvm.host import host_info, open_vm_meter
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine, uses_real_kvm
from memslots.machine.resize import ResizeJob
from memslots.machine.vm import GuestVm, ObservedChannel, boot_memory_end
from memslots.memory.address_space import Section
from memslots.options import (
    MAX_TRACE_SECONDS,
    MachineConfig,
    TraceStep,
    first_virtio_mem,
    with_strategy,
)
from memslots.reports import device_plan, to_json
from memslots.sizes import GiB

# -- traces ------------------------------------------------------------------------------------


SCENARIOS = ("ramp-up", "sawtooth", "burst")
#: The most steps a built-in scenario takes (each is a resize the guest model carries out).
MAX_SCENARIO_STEPS = 10_000


def scenario(
    name: str, max_size: int, granule: int, *, steps: int = 8, period: float = 60.0
) -> list[TraceStep]:
    """Built-in traces up to ``max_size``: ramp-up, sawtooth (up and down twice), burst.

    Every size is a multiple of ``granule`` (see :func:`scenario_granule`).
    """

    def at(fraction: float) -> int:
        return int(max_size * fraction) // granule * granule

    if name == "ramp-up":
        sizes = [at(i / steps) for i in range(steps + 1)]
    elif name == "sawtooth":
        up = [at(i / (steps // 2)) for i in range(steps // 2 + 1)]
        sizes = (up + up[-2:0:-1]) * 2 + [0]
    elif name == "burst":
        sizes = [at(1 / 16), at(1 / 16), at(1.0), at(1.0), at(1 / 16), at(1 / 16), at(0.5), 0]
    else:
        raise OptionError(f"unknown scenario '{name}' (known: {', '.join(SCENARIOS)})")
    if (len(sizes) - 1) * period > MAX_TRACE_SECONDS:
        raise OptionError(
            f"scenario {name}: {len(sizes)} steps every {period:g} s last longer than the "
            f"longest trace ({MAX_TRACE_SECONDS:.0f} s)"
        )
    return [TraceStep(i * period, s) for i, s in enumerate(sizes)]


def scenario_granule(config: MachineConfig, dev_id: str) -> int:
    """The step of sizes a Linux guest reaches on ``dev_id``: its driver adds memory in whole
    Linux memory blocks (big blocks in BBM) that must fit the usable region, which reaches only
    256 MiB past the request; with 1 GiB memory blocks 21.5 GiB stops at 21. The machine is
    planned (nothing mapped), so this also refuses a bad configuration before anything runs.
    """
    with Machine(config, vm=KvmModel(), planned=True) as machine:
        dev = machine.virtio_mem(dev_id)
        return max(dev.block_size, memory_block_size(boot_memory_end(machine)))


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
    #: Which of the device's memslots are mapped after the step (only when asked for: a
    #: 256-entry list per step is most of a long run's output).
    memslot_map: list[bool] | None = None
    request_log: list[dict[str, object]] | None = None
    #: Where ``kernel_metadata_measured`` comes from: "cgroup", "system" (may include other
    #: processes), or None on the model.
    kernel_metadata_source: str | None = None
    #: The model's figure for that source (memcg-charged or VmallocUsed bytes).
    kernel_metadata_source_model: int | None = None
    #: What this step's memslot deletes cost the guest, per the model (delete + re-fault).
    unmap_cost_ms: float = 0.0
    #: On the real kernel: the measured CPU time of this step's delete ioctls (the model's
    #: unit: the delete part of the unmap cost; wall-clock time also counts a busy host's
    #: waiting for a CPU).
    delete_ms_measured: float | None = None
    #: Why the guest stopped short of ``requested``, in its driver's words; None if it got
    #: there.
    stop_reason: str | None = None

    def as_dict(self) -> dict[str, object]:
        """The JSON shape of a step."""
        # Shallow: asdict's deep copy of every step's dicts and lists costs more than the step.
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for optional in ("memslot_map", "request_log"):
            if d[optional] is None:
                d.pop(optional)
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
    #: KVM's SLOT_ZAP_ALL setting and the guest working set the unmap-cost model assumed.
    slot_zap_all: bool = False
    working_set_frames: int = DEFAULT_WORKING_SET_FRAMES
    #: The device's kernel metadata (model) integrated over scheduler time, from the first
    #: step's start to the last step's start, at every change of the memory map.
    metadata_byte_seconds: float = 0.0

    def summary(self) -> dict[str, object]:
        """Totals over the run: memslot creates and deletes, kernel metadata (peak, and
        byte-seconds from the first step to the last one) and the unmap cost."""
        measured = [s.delete_ms_measured for s in self.steps if s.delete_ms_measured is not None]
        deletes = sum(s.memslot_deletes for s in self.steps)
        unmap = sum(s.unmap_cost_ms for s in self.steps)
        return {
            "memslot_creates": sum(s.memslot_creates for s in self.steps),
            "memslot_deletes": deletes,
            "kernel_metadata_peak_bytes": max(
                (s.kernel_metadata_bytes for s in self.steps), default=0
            ),
            "kernel_metadata_byte_seconds": self.metadata_byte_seconds,
            "unmap_cost_ms": unmap,
            "unmap_cost_ms_per_delete": unmap / deletes if deletes else 0.0,
            "delete_ms_measured": sum(measured) if measured else None,
            "slot_zap_all": self.slot_zap_all,
            "working_set_frames": self.working_set_frames,
        }

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
            "summary": self.summary(),
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
            "unmap_cost_ms",
            "delete_ms_measured",
            "outcome",
            "stop_reason",
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


class _MetadataIntegral:
    """A passive address-space listener that integrates kernel metadata over scheduler time.

    It is registered after KVM, so at each commit KVM already holds the new memslots.
    """

    def __init__(self, sched: Scheduler, current: Callable[[], int]) -> None:
        self.sched = sched
        self.current = current
        self.total = 0.0
        self._since = sched.now()
        #: The metadata now (as of the last change of the map).
        self.bytes = current()

    def advance(self) -> float:
        """Account for the time since the last change; the integral so far (byte-seconds)."""
        now = self.sched.now()
        self.total += self.bytes * (now - self._since)
        self._since = now
        return self.total

    def begin(self) -> None:
        """Nothing to do before a batch."""

    def region_del(self, section: Section) -> None:
        """Nothing to hold."""

    def region_add(self, section: Section) -> None:
        """Nothing to hold."""

    def commit(self) -> None:
        """The map changed now: close the interval at the old metadata."""
        self.advance()
        self.bytes = self.current()


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
    memslot_maps: bool = False,
    progress: Callable[[int], None] | None = None,
    meter: KmemMeter | None = None,
) -> SimResult:
    """Run ``trace`` on a booted guest; one :class:`StepRecord` per step.

    ``request_log`` and ``memslot_maps`` add each step's requests and memslot map to its record.
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
            memslot_maps=memslot_maps,
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
    memslot_maps: bool,
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
        slot_zap_all=machine.vm.slot_zap_all,
        working_set_frames=machine.kvm.working_set_frames,
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
    integral = _MetadataIntegral(sched, lambda: machine.kvm.predicted_metadata_bytes(in_dev))
    machine.address_space.register(integral)
    # Memslot operations between two steps (a delayed unmap, a guest retry) count for the later.
    creates, deletes = machine.kvm.creates, machine.kvm.deletes
    unmap_ms, delete_s = machine.kvm.unmap_cost_ms, machine.kvm.delete_cpu_seconds
    for i, step in enumerate(trace):
        sched.run_until(lambda: False, step.time)
        result.metadata_byte_seconds = integral.advance()
        log_start = len(guest.log)
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
            kernel_metadata_bytes=integral.bytes,
            kernel_metadata_measured=meter.read() - baseline if meter is not None else None,
            ideal_metadata_bytes=_ideal_metadata(dev, machine),
            single_metadata_bytes=single,
            outcome=res.outcome.value,
            memslot_map=[m.mapped for m in dev.memslot_map()] if memslot_maps else None,
            request_log=[r.as_dict() for r in new] if request_log else None,
            kernel_metadata_source=source,
            kernel_metadata_source_model=source_model(),
            unmap_cost_ms=machine.kvm.unmap_cost_ms - unmap_ms,
            delete_ms_measured=(machine.kvm.delete_cpu_seconds - delete_s) * 1e3 if real else None,
            stop_reason=None if res.ok else guest.stop_reason,
        )
        result.steps.append(record)
        creates, deletes = machine.kvm.creates, machine.kvm.deletes
        unmap_ms, delete_s = machine.kvm.unmap_cost_ms, machine.kvm.delete_cpu_seconds
        guest.verify()
        if progress:
            progress(i + 1)
    machine.address_space.unregister(integral)
    result.violations = list(guest.violations)
    return result


def run_simulation(
    config: MachineConfig,
    trace: Sequence[TraceStep],
    *,
    strategy: str = "dynamic",
    request_log: bool = False,
    memslot_maps: bool = False,
    progress: Callable[[int], None] | None = None,
    vm_factory: Callable[[], VmBackend] | None = None,
    guest_options: GuestOptions | None = None,
    working_set_frames: int = DEFAULT_WORKING_SET_FRAMES,
) -> SimResult:
    """Build the machine for ``strategy``, boot the guest, run ``trace``, tear it all down.

    ``working_set_frames`` is the guest working set the unmap-cost model assumes;
    ``request_log`` and ``memslot_maps`` are :func:`run_trace`'s.
    """
    dev_id = first_virtio_mem(config)
    config = with_strategy(config, dev_id, strategy)
    host = host_info()
    real = vm_factory is not None or uses_real_kvm(config.accel, host)
    # The meter is opened before the VM exists, so that everything the VM costs is in it.
    with (
        open_vm_meter() if real else contextlib.nullcontext() as meter,
        Machine(config, vm=vm_factory() if vm_factory is not None else None, host=host) as machine,
    ):
        machine.kvm.working_set_frames = working_set_frames
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
                memslot_maps=memslot_maps,
                progress=progress,
                meter=meter,
            )


DEFAULT_SIM_MEMORY = "4G,maxmem=260G"
DEFAULT_SIM_OBJECT = "memory-backend-ram,id=mem0,size=256G,reserve=off"
DEFAULT_SIM_DEVICE = "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"
DEFAULT_SIM_MAX = 64 * GiB
