"""What keeping unplugged memory out of reach costs: PLUG/UNPLUG latency and RSS, on and off.

The same machine with ``unplugged-inaccessible=on`` (unplugged blocks ``PROT_NONE``: a PLUG
runs an mprotect to read/write before its ACK, an UNPLUG one to ``PROT_NONE`` after the
discard) and ``off`` (QEMU's old behaviour), both with ``dynamic-memslots=off`` so that the
memslots are the same and only the protection differs; ``dynamic`` is QEMU 8.2's
``dynamic-memslots=on`` (which needs ``on``) beside them. On the KVM model (``sim``) and, where
``/dev/kvm`` exists, on the real kernel, where each mprotect also makes KVM drop its mappings
of the range (an MMU-notifier invalidation).

1. latency: single-block PLUG and UNPLUG round trips through the split virtqueue (the guest's
   add + kick + get_used, the device's work included), blocks 1.. of the device while block 0
   stays plugged (no memslot is created or deleted); p50/p99 in µs;
2. memory: the guest plugs 1 GiB (512 blocks) and writes 8 bytes into each block (from the
   vCPU on the real kernel, through guest RAM on the model); the backend's RSS (the kernel's
   ``Rss`` of its mapping, ``/proc/self/smaps``), the process's VmRSS growth, and the backend's
   memory areas (VMAs: every protected/unprotected boundary splits one), then the same with
   every other block of 2 GiB plugged (the worst case for VMAs at this size).

Settings alternate within each of ``--runs`` rounds, so that all see the same host load;
samples are pooled. Writes ``bench/results/protection_cost.{json,md}``.

    .venv/bin/python bench/protection_cost.py [--requests N] [--runs R] [--accel sim,kvm]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import hostinfo

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.devices.virtio_mem.wire import (
    REQUEST_SIZE,
    RESPONSE_SIZE,
    ReqType,
    Request,
    Resp,
    Response,
)
from memslots.host.memory import HostMemory
from memslots.kvm.system import kvm_available
from memslots.kvm.vcpu import ProbeVcpu
from memslots.kvm.vm import KvmVm
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory
from memslots.options import parse_machine_config
from memslots.sizes import GiB
from memslots.virtio.transport import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioMemTransport,
)
from memslots.virtio.virtqueue import DriverQueue

MEMORY = "1G,maxmem=9G"
BACKEND = "memory-backend-ram,id=mem0,size=8G,reserve=off"
SETTINGS = {
    "off": "dynamic-memslots=off,unplugged-inaccessible=off",
    "on": "dynamic-memslots=off,unplugged-inaccessible=on",
    "dynamic": "dynamic-memslots=on",
}
QUEUE_GPA = 0x40_0000
QUEUE_BYTES = 0x1_0000
REQ_GPA = 0x50_0000
RESP_GPA = 0x50_1000
WARMUP = 200
TOUCHED_BLOCKS = 512


def percentile(values: list[int], q: float) -> float:
    """The ``q`` quantile (nearest rank) of nanosecond samples, in µs."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 2)


def backend_rss(memory: HostMemory) -> tuple[int, int]:
    """``(Rss bytes, memory areas)`` of this process's mapping of ``memory`` (smaps)."""
    lo, hi = memory.host_addr, memory.host_addr + memory.size
    rss = areas = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start < hi and end > lo
                areas += inside
            elif inside and head == "Rss:":
                rss += int(line.split()[1]) * 1024
    return rss, areas


def vm_rss() -> int:
    """This process's VmRSS in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS in /proc/self/status")


class Guest:
    """A driver's queue in boot RAM and single-block requests through it."""

    def __init__(self, machine: Machine, dev: VirtioMem) -> None:
        self.dev = dev
        self.memory = GuestMemory(machine.address_space)
        self.transport = t = VirtioMemTransport(dev, self.memory)
        self.queue = DriverQueue(self.memory, QUEUE_GPA, QUEUE_BYTES, notify=t.notify)
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        t.write_driver_features(t.device_features)
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        q = self.queue
        t.setup_queue(q.num, q.desc_gpa, q.avail_gpa, q.used_gpa)
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    def send(self, kind: ReqType, block: int) -> int:
        """One request's round trip in ns; exits unless it was ACKed."""
        self.memory.write(
            REQ_GPA, Request(kind, self.dev.addr + block * self.dev.block_size, 1).pack()
        )
        t0 = time.perf_counter_ns()
        self.queue.add([(REQ_GPA, REQUEST_SIZE)], [(RESP_GPA, RESPONSE_SIZE)])
        self.queue.kick()
        used = self.queue.get_used()
        elapsed = time.perf_counter_ns() - t0
        resp = Response.unpack(self.memory.read(RESP_GPA, RESPONSE_SIZE))
        if used is None or resp.type != Resp.ACK:
            raise SystemExit(f"{kind.name} of block {block}: {resp} ({self.transport.error})")
        return elapsed


def machine_for(setting: str, accel: str) -> tuple[Machine, VirtioMem]:
    config = parse_machine_config(
        MEMORY, [BACKEND], [f"virtio-mem,id=vmem0,memdev=mem0,{SETTINGS[setting]}"], accel=accel
    )
    machine = Machine(config, vm=KvmVm() if accel == "kvm" else None)
    dev = machine.virtio_mem("vmem0")
    dev.set_requested_size(4 * GiB)
    return machine, dev


def latency(setting: str, accel: str, requests: int) -> dict[str, list[int]]:
    """PLUG and UNPLUG round trips (ns) of single blocks inside a mapped memslot."""
    samples: dict[str, list[int]] = {"PLUG": [], "UNPLUG": []}
    machine, dev = machine_for(setting, accel)
    with machine:
        guest = Guest(machine, dev)
        guest.send(ReqType.PLUG, 0)
        # Blocks of memslot 0 (of the first GiB with one big memslot), inside the usable region.
        per_slot = (dev.memslot_size or GiB) // dev.block_size
        creates = machine.kvm.creates
        for i in range(WARMUP + requests):
            block = 1 + i % (per_slot - 1)
            plug, unplug = guest.send(ReqType.PLUG, block), guest.send(ReqType.UNPLUG, block)
            if i >= WARMUP:
                samples["PLUG"].append(plug)
                samples["UNPLUG"].append(unplug)
        if machine.kvm.creates != creates:
            raise SystemExit("a measured request created a KVM memslot")
    return samples


def memory_use(setting: str, accel: str) -> dict[str, int]:
    """RSS and memory areas after the guest plugged and touched 1 GiB, then a checkerboard."""
    machine, dev = machine_for(setting, accel)
    with machine:
        guest = Guest(machine, dev)
        memory = machine.backends["mem0"].memory
        assert isinstance(memory, HostMemory)
        vcpu = ProbeVcpu(machine.vm, guest.memory) if isinstance(machine.vm, KvmVm) else None
        try:
            before = vm_rss()
            bs = dev.block_size
            for block in range(TOUCHED_BLOCKS):
                guest.send(ReqType.PLUG, block)
            words = [(dev.addr + b * bs + 64, b + 1) for b in range(TOUCHED_BLOCKS)]
            if vcpu is not None:
                if not vcpu.write64_many(words):
                    raise SystemExit("plugged memory came back as MMIO")
            else:
                for gpa, value in words:
                    guest.memory.write(gpa, value.to_bytes(8, "little"))
            rss, areas = backend_rss(memory)
            grown = vm_rss() - before
            for block in range(TOUCHED_BLOCKS):
                guest.send(ReqType.UNPLUG, block)
            for block in range(0, 2 * TOUCHED_BLOCKS, 2):
                guest.send(ReqType.PLUG, block)
            _, checker_areas = backend_rss(memory)
        finally:
            if vcpu is not None:
                vcpu.close()
    return {
        "backend_rss_bytes": rss,
        "process_rss_growth_bytes": grown,
        "backend_areas": areas,
        "checkerboard_areas": checker_areas,
    }


def measure(accels: list[str], requests: int, runs: int) -> dict[str, dict[str, Any]]:
    """Every setting on every accelerator, alternating within each run."""
    pooled: dict[tuple[str, str], dict[str, list[int]]] = {}
    memory: dict[tuple[str, str], dict[str, int]] = {}
    for run in range(runs):
        for accel in accels:
            order = list(SETTINGS) if run % 2 == 0 else list(reversed(SETTINGS))
            for setting in order:
                got = latency(setting, accel, requests)
                cell = pooled.setdefault((accel, setting), {"PLUG": [], "UNPLUG": []})
                for kind, values in got.items():
                    cell[kind] += values
                if run == 0:
                    memory[(accel, setting)] = memory_use(setting, accel)
    out: dict[str, dict[str, Any]] = {}
    for (accel, setting), cell in pooled.items():
        entry: dict[str, Any] = {
            kind: {"p50_us": percentile(v, 0.5), "p99_us": percentile(v, 0.99), "samples": len(v)}
            for kind, v in cell.items()
        }
        entry.update(memory[(accel, setting)])
        out.setdefault(accel, {})[setting] = entry
    for settings in out.values():
        for kind in ("PLUG", "UNPLUG"):
            settings["on"][kind]["vs_off"] = round(
                settings["on"][kind]["p50_us"] / settings["off"][kind]["p50_us"], 2
            )
    return out


def markdown(results: dict[str, dict[str, Any]], meta: dict[str, str]) -> str:
    """The results as Markdown tables with the command and the host."""
    lines = [
        "# What unplugged memory out of reach costs (unplugged-inaccessible on vs off)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Host: {meta['host']}; Python {meta['python']}; {meta['date']}.",
        f"Machine: `-m {MEMORY} -object {BACKEND} -device virtio-mem,id=vmem0,memdev=mem0,...`:",
        "`off` and `on` with dynamic-memslots=off (one memslot), `dynamic` with "
        "dynamic-memslots=on.",
        "",
        "| accel | setting | PLUG p50 / p99 (µs) | UNPLUG p50 / p99 (µs) | p50 on/off "
        "| backend RSS, 1 GiB plugged and touched | process RSS growth | backend VMAs "
        "| VMAs, every other block of 2 GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for accel, settings in results.items():
        for setting, r in settings.items():
            ratio = (
                f"{r['PLUG']['vs_off']} / {r['UNPLUG']['vs_off']}" if "vs_off" in r["PLUG"] else ""
            )
            lines.append(
                f"| {accel} | {setting} | {r['PLUG']['p50_us']} / {r['PLUG']['p99_us']} "
                f"| {r['UNPLUG']['p50_us']} / {r['UNPLUG']['p99_us']} | {ratio} "
                f"| {r['backend_rss_bytes'] / 2**20:.1f} MiB "
                f"| {r['process_rss_growth_bytes'] / 2**20:.1f} MiB | {r['backend_areas']} "
                f"| {r['checkerboard_areas']} |"
            )
    lines += [
        "",
        "Round trips through the split virtqueue, single 2 MiB blocks inside a mapped memslot; "
        f"{meta['samples']} samples per cell. RSS: the kernel's Rss of the backend's mapping "
        "(smaps) after the guest wrote 8 bytes into each of 512 plugged blocks (transparent "
        "huge pages back each touched block with 2 MiB).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark, print the results and write them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests of each type")
    parser.add_argument("--runs", type=int, default=3, help="rounds over the settings")
    parser.add_argument("--accel", default="sim,kvm", help="sim, kvm or both")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results")
    args = parser.parse_args()
    accels = [a for a in args.accel.split(",") if a != "kvm" or kvm_available()]
    results = measure(accels, args.requests, args.runs)
    meta = {
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "host": hostinfo.describe(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "samples": str(args.requests * args.runs),
    }
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "protection_cost.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
        )
        (args.out / "protection_cost.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
