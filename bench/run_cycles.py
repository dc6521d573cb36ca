"""Benchmark: 10^4 plug/unplug cycles through QMP leave ``memslots run`` where it was.

Starts Debian's qemu-storage-daemon (a vhost-user-blk back-end) and ``memslots run`` with a
virtio-mem device of 1 GiB memslots beside it (real KVM and the probe vCPU where there is
``/dev/kvm``), then resizes the device between 0 and ``--size`` through QMP ``qom-set``,
waiting each time until the guest model got there (``qom-get size``). After ``--warmup``
cycles and every ``--every`` cycles it samples the process: RSS (``VmRSS``), open descriptors,
mappings (``/proc/PID/maps`` lines), KVM memslots in use and per-VM kernel memory
(``x-query-kernel-metadata``), after ``SETTLE`` seconds of quiet: the kernel frees some objects
(page-table pages, the memfd's xarray nodes) only after an RCU grace period, so a reading right
after the last unplug holds up to ~200 KiB that is about to go (the 208 KiB "step" of an earlier
run; after 0.3 s of quiet readings of the same state agree to the page). Issue 9's acceptance:
descriptors, mappings and memslots unchanged after the warm-up, kernel memory unchanged (within
a page per CPU: the slab's per-CPU object stock), RSS within 2 MiB.

    .venv/bin/python bench/run_cycles.py [--cycles 10000] [--size 1G] [--warmup 500]

Writes bench/results/run_cycles.{json,md}; exits 1 if the acceptance is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from memslots.kvm.system import kvm_available
from memslots.sizes import GiB, KiB, MiB, format_size, parse_size

RESULTS = Path(__file__).parent / "results"
QSD = "/usr/bin/qemu-storage-daemon"
RSS_BOUND = 2 * MiB
#: The slab charges objects to the memory cgroup in pages from a per-CPU stock.
KMEM_NOISE = (os.cpu_count() or 1) * os.sysconf("SC_PAGE_SIZE")
#: Seconds of quiet before a sample (RCU-deferred frees, see above).
SETTLE = 0.5


def start_qsd(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    """qemu-storage-daemon exporting a 1 MiB image over vhost-user-blk; waits for its socket."""
    disk, sock = os.path.join(workdir, "disk.img"), os.path.join(workdir, "qsd.sock")
    with open(disk, "wb") as f:
        f.truncate(MiB)
    proc = subprocess.Popen(
        [
            QSD,
            "--blockdev",
            f"driver=file,node-name=file0,filename={disk}",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: os.path.exists(sock), proc, "qemu-storage-daemon")
    return proc, sock


def start_run(workdir: str, qsd_sock: str, device_size: int) -> tuple[subprocess.Popen[bytes], str]:
    """``memslots run`` with the back-end and a virtio-mem device; waits for its QMP socket."""
    sock = os.path.join(workdir, "qmp.sock")
    argv = [
        sys.executable,
        "-m",
        "memslots.cli.main",
        "run",
        "-m",
        f"1G,maxmem={device_size + GiB}",
        "-object",
        f"memory-backend-memfd,id=mem0,size={device_size},share=on,reserve=off",
        "-chardev",
        f"socket,id=blk0,path={qsd_sock}",
        "-device",
        "vhost-user-blk-pci,id=disk0,chardev=blk0,memslot-accounting=precise",
        "-device",
        "virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G",
        "-qmp",
        f"unix:{sock},server=on,wait=off",
    ]
    log = open(os.path.join(workdir, "run.log"), "wb")  # noqa: SIM115 (the child's, for its life)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_for(lambda: os.path.exists(sock), proc, "memslots run")
    return proc, sock


def wait_for(ready: Any, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.02)


def process_sample(pid: int) -> dict[str, int]:
    """RSS, descriptors and mappings of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * KiB for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    return {"rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "maps": maps}


async def drive(
    sock: str, pid: int, cycles: int, size: int, warmup: int, every: int, report: Any
) -> Any:
    qmp = QMPClient("run_cycles")
    await qmp.connect(sock)
    prop = {"path": "vmem0", "property": "requested-size"}

    async def reach(target: int) -> None:
        await qmp.execute("qom-set", {**prop, "value": target})
        while await qmp.execute("qom-get", {"path": "vmem0", "property": "size"}) != target:
            await asyncio.sleep(0.001)

    async def sample(cycle: int, seconds: float) -> dict[str, Any]:
        await asyncio.sleep(SETTLE)
        kmeta: Any = await qmp.execute("x-query-kernel-metadata")
        budget: Any = await qmp.execute("x-query-memslot-budget")
        kvm = next(c for c in budget["consumers"] if c["name"] == "kvm")
        kmem = kmeta.get("kernel-memory")
        return {
            "cycle": cycle,
            "seconds": round(seconds, 1),
            **process_sample(pid),
            "kvm_memslots": kvm["used-memslots"],
            "kernel_memory": kmem["bytes"] if kmem else None,
            "kernel_memory_source": kmem["source"] if kmem else None,
        }

    samples = []
    t0 = time.monotonic()
    for i in range(1, cycles + 1):
        await reach(size)
        await reach(0)
        qmp.events.clear()  # the client's catch-all queue, not the server's
        if (i >= warmup and (i - warmup) % every == 0) or i == cycles:
            samples.append(await sample(i, time.monotonic() - t0))
            s = samples[-1]
            print(
                f"cycle {i}: rss {format_size(s['rss'])}, fds {s['fds']}, maps {s['maps']}, "
                f"kvm memslots {s['kvm_memslots']}, kernel memory {s['kernel_memory']}",
                flush=True,
            )
            if i < cycles:
                report(samples)
    await qmp.execute("quit")
    with contextlib.suppress(EOFError):
        await qmp.disconnect()
    return samples


def write_report(args: argparse.Namespace, samples: list[dict[str, Any]], *, done: bool) -> Any:
    """Write the results so far (after every sample, so that an interrupted run leaves its
    data); returns the acceptance checks."""
    size, device_size = parse_size(args.size), parse_size(args.device_size)
    base, last = samples[0], samples[-1]
    kmem = [s["kernel_memory"] for s in samples if s["kernel_memory"] is not None]
    checks = {
        "fds_unchanged": all(s["fds"] == base["fds"] for s in samples),
        "maps_unchanged": all(s["maps"] == base["maps"] for s in samples),
        "kvm_memslots_unchanged": all(s["kvm_memslots"] == base["kvm_memslots"] for s in samples),
        "kernel_memory_unchanged": not kmem or max(kmem) - min(kmem) <= KMEM_NOISE,
        "rss_within_2_MiB": max(s["rss"] for s in samples) - base["rss"] <= RSS_BOUND,
    }
    report = {
        "cycles": args.cycles,
        "cycles_done": last["cycle"],
        "complete": done,
        "size": size,
        "device_size": device_size,
        "warmup": args.warmup,
        "accel": "kvm" if kvm_available() else "sim",
        "rss_growth_after_warmup": last["rss"] - base["rss"],
        "rss_max_growth_after_warmup": max(s["rss"] for s in samples) - base["rss"],
        "kernel_memory_spread": max(kmem) - min(kmem) if kmem else None,
        "checks": checks,
        "samples": samples,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "run_cycles.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# {last['cycle']} of {args.cycles} plug/unplug cycles (0 <-> {format_size(size)}) "
        "through QMP" + ("" if done else " (interrupted: partial)"),
        "",
        f"`bench/run_cycles.py`: `memslots run` ({report['accel']}), qemu-storage-daemon "
        f"attached, virtio-mem of {format_size(device_size)} in 1 GiB memslots; samples after "
        f"{args.warmup} warm-up cycles.",
        "",
        "| cycle | seconds | RSS | fds | maps lines | KVM memslots | kernel memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in samples:
        km = format_size(s["kernel_memory"]) if s["kernel_memory"] is not None else "-"
        lines.append(
            f"| {s['cycle']} | {s['seconds']} | {format_size(s['rss'])} | {s['fds']} | "
            f"{s['maps']} | {s['kvm_memslots']} | {km} ({s['kernel_memory_source']}) |"
        )
    lines += [
        "",
        f"RSS after warm-up: {report['rss_growth_after_warmup'] / KiB:+.0f} KiB at the end, "
        f"{report['rss_max_growth_after_warmup'] / KiB:+.0f} KiB at most (bound 2 MiB); "
        f"kernel memory spread (bound {KMEM_NOISE / KiB:.0f} KiB) "
        + (
            f"{report['kernel_memory_spread'] / KiB:.0f} KiB"
            if report["kernel_memory_spread"] is not None
            else "n/a (no KVM)"
        )
        + ".",
        "",
        "Checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()) + ".",
    ]
    (RESULTS / "run_cycles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-3:]))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--size", default="1G", help="plugged size of each cycle")
    parser.add_argument("--device-size", default="8G")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--every", type=int, default=500)
    args = parser.parse_args()
    if not os.access(QSD, os.X_OK):
        print(f"needs {QSD} (bash scripts/setup.sh --tests installs it)", file=sys.stderr)
        return 2
    size, device_size = parse_size(args.size), parse_size(args.device_size)
    with tempfile.TemporaryDirectory(prefix="cycles", dir="/tmp") as workdir:
        qsd, qsd_sock = start_qsd(workdir)
        try:
            run, sock = start_run(workdir, qsd_sock, device_size)
            try:
                samples = asyncio.run(
                    drive(
                        sock,
                        run.pid,
                        args.cycles,
                        size,
                        args.warmup,
                        args.every,
                        lambda so_far: write_report(args, so_far, done=False),
                    )
                )
                run.wait(60)
            finally:
                if run.poll() is None:
                    run.kill()
                    run.wait()
        finally:
            qsd.kill()
            qsd.wait()
    checks = write_report(args, samples, done=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
