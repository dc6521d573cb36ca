"""Benchmark: grow a 1 TiB virtio-mem device from 1 GiB to 1 TiB, Python vs kernel time.

The Linux guest model plugs through the virtqueue as a real guest would (with the default
layout the guest's memory blocks are 1 GiB: one PLUG of 512 blocks per request); the device maps
a 4 GiB memslot every fourth request. Time is split into:

* kernel: the KVM_SET_USER_MEMORY_REGION ioctls (memslot creates), measured around each ioctl;
* VMM Python: the device's side (virtqueue, request handling, address space, memslot
  bookkeeping) minus the kernel time;
* guest model: everything else (the Linux driver model's own bookkeeping).

The guest does not write into the memory here (that is guest work, measured elsewhere).

    .venv/bin/python bench/grow.py [--accel kvm|sim] [--repeat 3]

Writes bench/results/grow.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from memslots.kvm.host import host_info
from memslots.machine.machine import Machine, create_vm
from memslots.machine.vm import GuestVm
from memslots.options import parse_machine_config
from memslots.sizes import GiB, TiB

RESULTS = Path(__file__).parent / "results"


def one_run(accel: str) -> dict[str, float]:
    """One grow; returns the seconds of each part."""
    config = parse_machine_config(
        "4G,maxmem=1028G",
        ["memory-backend-ram,id=mem0,size=1T,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on,requested-size=1G"],
        accel=accel,
    )
    with (
        Machine(config, vm=create_vm(accel, host=host_info())) as machine,
        GuestVm(machine, use_memory=False) as vm,
    ):
        vm.settle()
        transport = vm.transports["vmem0"]
        device_seconds = 0.0
        inner = transport.notify

        def timed_notify() -> None:
            nonlocal device_seconds
            t0 = time.perf_counter()
            inner()
            device_seconds += time.perf_counter() - t0

        vm.channels["vmem0"].queue.notify = timed_notify
        kernel0, creates0 = machine.kvm.kernel_seconds, machine.kvm.creates
        requests0 = len(vm.guests["vmem0"].log)
        t0 = time.perf_counter()
        result = vm.resize("vmem0", TiB).wait(3600)
        total = time.perf_counter() - t0
        assert result.ok, result.reason
        kernel = machine.kvm.kernel_seconds - kernel0
        return {
            "total_seconds": total,
            "kernel_seconds": kernel,
            "vmm_python_seconds": device_seconds - kernel,
            "guest_model_seconds": total - device_seconds,
            "memslot_creates": machine.kvm.creates - creates0,
            "requests": len(vm.guests["vmem0"].log) - requests0,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accel", choices=("kvm", "sim"), default="kvm")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.accel == "kvm" and not host_info().kvm:
        print("grow: /dev/kvm is not available (use --accel sim for the model)", file=sys.stderr)
        return 2
    runs = [one_run(args.accel) for _ in range(args.repeat)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ratio = med["vmm_python_seconds"] / med["kernel_seconds"] if med["kernel_seconds"] else None
    report = {
        "command": " ".join(["bench/grow.py", *sys.argv[1:]]),
        "accel": args.accel,
        "runs": runs,
        "median": med,
        "vmm_python_over_kernel": ratio,
        "device_size": TiB,
        "from": GiB,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grow.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Grow a 1 TiB virtio-mem device from 1 GiB to 1 TiB ({args.accel}, median of "
        f"{args.repeat})",
        "",
        "| part | seconds |",
        "|---|---|",
        f"| kernel (memslot creates, {int(med['memslot_creates'])} of them) "
        f"| {med['kernel_seconds']:.3f} |",
        f"| VMM Python (device side, without the kernel) | {med['vmm_python_seconds']:.3f} |",
        f"| guest model (Linux driver model, {int(med['requests'])} requests) "
        f"| {med['guest_model_seconds']:.3f} |",
        f"| total | {med['total_seconds']:.3f} |",
        "",
        f"VMM Python / kernel = {ratio:.3f}" if ratio is not None else "no kernel time (model)",
        "",
        f"Command: `.venv/bin/python {report['command']}`",
    ]
    (RESULTS / "grow.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
