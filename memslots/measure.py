"""Measuring what memslots really cost the kernel, single vs dynamic: kernel memory and time.

Each run happens inside its own per-VM kernel-memory meter (:mod:`memslots.host.kmem`): a memory
cgroup of our own where one can be created, so that other processes on the host cannot move the
figure, else the system-wide ``VmallocUsed``. Every figure says which (``source``), and the
model's figure it is compared with is the one for that source (memcg-charged or vmalloc pages).
:func:`compare` repeats the pair in alternating order so that neither layout alone pays the host's
first-touch cost, and reports the minimum and the median.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memslots.guest.inorder import drive_to
from memslots.host.kmem import SYSTEM, KmemMeter
from memslots.kvm.abi import VmBackend
from memslots.kvm.host import open_vm_meter
from memslots.kvm.vm import KvmVm
from memslots.machine.machine import Machine
from memslots.memory.address_space import Section
from memslots.options import BackendOptions, MachineConfig, MachineMemory, VirtioMemOptions
from memslots.sizes import GiB

#: Pairs measured by default: single/dynamic, dynamic/single, single/dynamic.
DEFAULT_REPEATS = 3


@dataclass(frozen=True)
class Run:
    """One realize+plug run of a virtio-mem device on a VM."""

    dynamic: bool
    kernel_metadata_bytes: int
    seconds: float
    memslots_mapped: int
    predicted_bytes: int
    requests: int
    #: Where ``kernel_metadata_bytes`` comes from: "cgroup" or "system" (see memslots.host.kmem).
    source: str = SYSTEM
    #: The model's two figures; ``predicted_bytes`` is the one for ``source``.
    predicted_vmalloc_bytes: int = 0
    predicted_memcg_bytes: int = 0


def measure_run(
    device_size: int,
    plugged: int,
    *,
    dynamic: bool,
    vm_factory: Callable[[], VmBackend] = KvmVm,
    ram_size: int = 4 * GiB,
    meter_factory: Callable[[], KmemMeter] = open_vm_meter,
) -> Run:
    """Realize a machine with one virtio-mem device, plug ``plugged`` bytes, measure.

    The kernel figure is the rise of the meter from just before the device is realized to just
    after the plug, so boot RAM is not counted. The meter is opened before the VM is created, so
    a per-VM cgroup holds this VM only; the VM is closed before returning.
    """
    config = MachineConfig(
        memory=MachineMemory(ram_size=ram_size, maxmem=ram_size + device_size),
        backends=(
            BackendOptions(
                qom_type="memory-backend-ram",
                id="mem0",
                size=device_size,
                share=False,
                reserve=False,
            ),
        ),
    )
    with meter_factory() as meter, Machine(config, vm=vm_factory()) as machine:
        before = meter.read()
        t0 = time.perf_counter()
        dev = machine.add_device(
            VirtioMemOptions(id="vmem0", memdev="mem0", dynamic_memslots=dynamic)
        )
        requests = drive_to(dev, plugged) if plugged else 0
        seconds = time.perf_counter() - t0
        after = meter.read()
        dm = machine.device_memory
        assert dm is not None

        def in_device(s: Section) -> bool:
            return dm.base <= s.gpa < dm.base + dm.size

        return Run(
            dynamic=dynamic,
            kernel_metadata_bytes=after - before,
            seconds=seconds,
            memslots_mapped=dm.used_memslots,
            predicted_bytes=machine.kvm.predicted_kernel_bytes(meter.source, in_device),
            requests=requests,
            source=meter.source,
            predicted_vmalloc_bytes=machine.kvm.predicted_metadata_bytes(in_device),
            predicted_memcg_bytes=machine.kvm.predicted_memcg_bytes(in_device),
        )


def _summary(runs: Sequence[Run]) -> Run:
    """One run standing for ``runs``: the median kernel figure (an observed one) and time."""
    return dataclasses.replace(
        runs[0],
        kernel_metadata_bytes=statistics.median_low(r.kernel_metadata_bytes for r in runs),
        seconds=statistics.median(r.seconds for r in runs),
    )


@dataclass(frozen=True)
class Comparison:
    """Single memslot vs dynamic memslots for the same device and plugged size, repeated.

    ``singles`` and ``dynamics`` are the runs in the order they were taken; ``order`` says how
    they interleaved. ``single`` and ``dynamic`` summarize them (medians).
    """

    device_size: int
    plugged: int
    singles: tuple[Run, ...]
    dynamics: tuple[Run, ...]
    order: tuple[str, ...] = ()
    source_detail: str = ""

    @property
    def single(self) -> Run:
        """The single-memslot runs summarized (median kernel figure and time)."""
        return _summary(self.singles)

    @property
    def dynamic(self) -> Run:
        """The dynamic-memslots runs summarized (median kernel figure and time)."""
        return _summary(self.dynamics)

    @property
    def source(self) -> str:
        """ "cgroup" if every run was measured in its own cgroup, else "system"."""
        runs = (*self.singles, *self.dynamics)
        return runs[0].source if all(r.source == runs[0].source for r in runs) else SYSTEM

    def to_json(self) -> dict[str, object]:
        """The ``measure --json`` object.

        ``single``/``dynamic`` keep their keys (``kernel_metadata_bytes`` and ``seconds`` are the
        medians) and add ``*_min``/``*_median`` and every run; ``model.*.kernel_metadata_bytes``
        is the model's figure for the measured ``source``.
        """

        def run(runs: Sequence[Run]) -> dict[str, object]:
            s = _summary(runs)
            kernel = [r.kernel_metadata_bytes for r in runs]
            seconds = [r.seconds for r in runs]
            return {
                "kernel_metadata_bytes": s.kernel_metadata_bytes,
                "seconds": s.seconds,
                "memslots_mapped": s.memslots_mapped,
                "requests": s.requests,
                "source": s.source,
                "kernel_metadata_bytes_min": min(kernel),
                "kernel_metadata_bytes_median": s.kernel_metadata_bytes,
                "seconds_min": min(seconds),
                "seconds_median": s.seconds,
                "runs": [
                    {"kernel_metadata_bytes": r.kernel_metadata_bytes, "seconds": r.seconds}
                    for r in runs
                ],
            }

        def model(r: Run) -> dict[str, object]:
            return {
                "kernel_metadata_bytes": r.predicted_bytes,
                "vmalloc_used_bytes": r.predicted_vmalloc_bytes,
                "memcg_charged_bytes": r.predicted_memcg_bytes,
            }

        single, dynamic = self.single, self.dynamic
        return {
            "device_size": self.device_size,
            "plugged": self.plugged,
            "source": self.source,
            "source_detail": self.source_detail,
            "disturbed": self.source == SYSTEM,
            "repeats": len(self.singles),
            "order": list(self.order),
            "single": run(self.singles),
            "dynamic": run(self.dynamics),
            "model": {"single": model(single), "dynamic": model(dynamic)},
            "ratios": {
                "kernel_metadata": _ratio(
                    dynamic.kernel_metadata_bytes, single.kernel_metadata_bytes
                ),
                "seconds": _ratio(dynamic.seconds, single.seconds),
            },
        }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def measurement_order(repeats: int) -> list[bool]:
    """``dynamic`` flags in the order measured: pairs alternate single-first and dynamic-first."""
    order: list[bool] = []
    for i in range(repeats):
        order += [False, True] if i % 2 == 0 else [True, False]
    return order


def compare(
    device_size: int,
    plugged: int,
    *,
    repeats: int = DEFAULT_REPEATS,
    vm_factory: Callable[[], VmBackend] = KvmVm,
    on_phase: Callable[[str], None] | None = None,
    meter_factory: Callable[[], KmemMeter] = open_vm_meter,
) -> Comparison:
    """Measure single (dynamic-memslots=off) and dynamic ``repeats`` times each, alternating.

    The first big memslot a process creates pays the host's first-touch cost; alternating which
    layout goes first in each pair keeps that from landing on one of them only.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    runs: dict[bool, list[Run]] = {False: [], True: []}
    order = measurement_order(repeats)
    detail = ""
    for i, dynamic in enumerate(order):
        if on_phase:
            what = (
                "dynamic memslots (dynamic-memslots=on)"
                if dynamic
                else ("single memslot (dynamic-memslots=off)")
            )
            on_phase(f"{what}, run {i + 1} of {len(order)}")

        def meter() -> KmemMeter:
            nonlocal detail
            m = meter_factory()
            detail = m.describe()
            return m

        runs[dynamic].append(
            measure_run(
                device_size, plugged, dynamic=dynamic, vm_factory=vm_factory, meter_factory=meter
            )
        )
    return Comparison(
        device_size,
        plugged,
        tuple(runs[False]),
        tuple(runs[True]),
        tuple("dynamic" if d else "single" for d in order),
        detail,
    )
