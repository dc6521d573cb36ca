"""Measuring what memslots really cost the kernel: VmallocUsed and time, single vs dynamic.

KVM allocates its per-memslot metadata with vmalloc, so the rise of ``VmallocUsed`` in
``/proc/meminfo`` while a memslot exists is what that memslot costs. Other kernel activity moves
the counter too, so every reading is the median of several samples taken back to back.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from memslots.errors import MeasurementError
from memslots.guest.inorder import drive_to
from memslots.kvm.abi import VmBackend
from memslots.kvm.vm import KvmVm
from memslots.machine.machine import Machine
from memslots.options import BackendOptions, MachineConfig, MachineMemory, VirtioMemOptions
from memslots.sizes import GiB

MEMINFO = "/proc/meminfo"


def read_vmalloc_used(path: str = MEMINFO) -> int:
    """``VmallocUsed`` in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("VmallocUsed:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise MeasurementError(f"cannot read {path}: {exc}") from exc
    raise MeasurementError(f"{path} has no VmallocUsed line")


def sample_vmalloc_used(samples: int = 5, path: str = MEMINFO) -> int:
    """Median of ``samples`` back-to-back readings of VmallocUsed, in bytes."""
    return int(statistics.median(read_vmalloc_used(path) for _ in range(samples)))


@dataclass(frozen=True)
class Run:
    """One realize+plug run of a virtio-mem device on a VM."""

    dynamic: bool
    kernel_metadata_bytes: int
    seconds: float
    memslots_mapped: int
    predicted_bytes: int
    requests: int


def measure_run(
    device_size: int,
    plugged: int,
    *,
    dynamic: bool,
    vm_factory: Callable[[], VmBackend] = KvmVm,
    ram_size: int = 4 * GiB,
) -> Run:
    """Realize a machine with one virtio-mem device, plug ``plugged`` bytes, measure.

    The kernel figure is the VmallocUsed rise from just before the device is realized to just
    after the plug, so boot RAM is not counted; the VM is closed before returning.
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
    with Machine(config, vm=vm_factory()) as machine:
        before = sample_vmalloc_used()
        t0 = time.perf_counter()
        dev = machine.add_device(
            VirtioMemOptions(id="vmem0", memdev="mem0", dynamic_memslots=dynamic)
        )
        requests = drive_to(dev, plugged) if plugged else 0
        seconds = time.perf_counter() - t0
        after = sample_vmalloc_used()
        dm = machine.device_memory
        assert dm is not None
        predicted = machine.kvm.predicted_metadata_bytes(
            lambda s: dm.base <= s.gpa < dm.base + dm.size
        )
        return Run(
            dynamic=dynamic,
            kernel_metadata_bytes=after - before,
            seconds=seconds,
            memslots_mapped=dm.used_memslots,
            predicted_bytes=predicted,
            requests=requests,
        )


@dataclass(frozen=True)
class Comparison:
    """Single memslot vs dynamic memslots for the same device and plugged size."""

    device_size: int
    plugged: int
    single: Run
    dynamic: Run

    def to_json(self) -> dict[str, object]:
        """The ``measure --json`` object."""

        def run(r: Run) -> dict[str, object]:
            d = asdict(r)
            d.pop("dynamic")
            d.pop("predicted_bytes")
            return d

        return {
            "device_size": self.device_size,
            "plugged": self.plugged,
            "single": run(self.single),
            "dynamic": run(self.dynamic),
            "model": {
                "single": {"kernel_metadata_bytes": self.single.predicted_bytes},
                "dynamic": {"kernel_metadata_bytes": self.dynamic.predicted_bytes},
            },
            "ratios": {
                "kernel_metadata": _ratio(
                    self.dynamic.kernel_metadata_bytes, self.single.kernel_metadata_bytes
                ),
                "seconds": _ratio(self.dynamic.seconds, self.single.seconds),
            },
        }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def compare(
    device_size: int,
    plugged: int,
    *,
    vm_factory: Callable[[], VmBackend] = KvmVm,
    on_phase: Callable[[str], None] | None = None,
) -> Comparison:
    """Measure single (dynamic-memslots=off) first, then dynamic, in the same process."""
    if on_phase:
        on_phase("single memslot (dynamic-memslots=off)")
    single = measure_run(device_size, plugged, dynamic=False, vm_factory=vm_factory)
    if on_phase:
        on_phase("dynamic memslots (dynamic-memslots=on)")
    dynamic = measure_run(device_size, plugged, dynamic=True, vm_factory=vm_factory)
    return Comparison(device_size, plugged, single, dynamic)
