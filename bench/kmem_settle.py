"""Benchmark: why per-VM kernel memory read right after an unplug moves, and when it does not.

A machine on real KVM (in a memory cgroup of its own) with an 8 GiB virtio-mem device of 1 GiB
memslots and the Linux guest model cycles 0 -> 1 GiB -> 0, ``--cycles`` times, with the probe
vCPU and without it (the guest then writes through the VMM's mapping). After each cycle it
reads the VM's kernel memory at once and again after ``--settle`` seconds of quiet. The same
state every time, so every difference between readings is the kernel's timing: objects it
frees an RCU grace period late (page-table pages, the memfd's xarray nodes) are still charged
right after the unplug.

    .venv/bin/python bench/kmem_settle.py [--cycles 200] [--settle 0.3]

Writes bench/results/kmem_settle.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from memslots.guest.linux import GuestOptions
from memslots.guest.sched import Scheduler
from memslots.kvm.host import host_info, open_vm_meter
from memslots.machine.machine import Machine
from memslots.machine.vm import GuestVm
from memslots.options import parse_machine_config
from memslots.sizes import GiB, KiB

RESULTS = Path(__file__).parent / "results"


def cycle_readings(cycles: int, settle: float, *, vcpu: bool) -> dict[str, list[int]]:
    """Kernel memory after each cycle, at once and settled, relative to the first reading."""
    config = parse_machine_config(
        "1G,maxmem=9G",
        ["memory-backend-memfd,id=mem0,size=8G,share=on,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G"],
        accel="kvm",
    )
    at_once: list[int] = []
    settled: list[int] = []
    with open_vm_meter() as meter, Machine(config, host=host_info()) as machine:
        options = GuestOptions(boot_memory_end=0, request_log=64)
        with GuestVm(machine, Scheduler(), guest_options=options, vcpu=vcpu) as guests:
            dev = machine.virtio_mem("vmem0")
            for _ in range(cycles):
                for size in (GiB, 0):
                    dev.set_requested_size(size)
                    guests.settle()
                at_once.append(meter.used())
                time.sleep(settle)
                settled.append(meter.used())
    base = settled[0]
    return {"at_once": [v - base for v in at_once], "settled": [v - base for v in settled]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--settle", type=float, default=0.3, help="seconds of quiet")
    args = parser.parse_args()
    if not host_info().kvm:
        print("needs /dev/kvm", file=sys.stderr)
        return 2
    host_info()  # probe the host before any meter opens (its probe VM frees late)
    rows: list[dict[str, Any]] = []
    for vcpu in (True, False):
        got = cycle_readings(args.cycles, args.settle, vcpu=vcpu)
        for when, values in got.items():
            rows.append(
                {
                    "vcpu": vcpu,
                    "when": when,
                    "min": min(values),
                    "max": max(values),
                    "spread": max(values) - min(values),
                }
            )
    meta = {
        "command": f".venv/bin/python bench/kmem_settle.py --cycles {args.cycles} "
        f"--settle {args.settle}",
        "host": f"{os.cpu_count()} CPUs, Linux {platform.release()}, {host_info().describe()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kmem_settle.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Kernel memory of the same state, read at once and after a quiet moment",
        "",
        f"`{meta['command']}` ({meta['host']}, {meta['date']}): {args.cycles} cycles "
        "0 -> 1 GiB -> 0 of an 8 GiB virtio-mem device in 1 GiB memslots; readings relative "
        "to the first settled one.",
        "",
        "| guest uses memory through | read | min | max | spread |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        when = "at once" if r["when"] == "at_once" else f"after {args.settle} s"
        lines.append(
            f"| {'the vCPU' if r['vcpu'] else 'the VMM mapping'} | {when} | "
            f"{r['min'] / KiB:+.0f} KiB | {r['max'] / KiB:+.0f} KiB | {r['spread'] / KiB:.0f} KiB |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "kmem_settle.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
