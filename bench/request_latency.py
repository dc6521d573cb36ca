"""Per-request latency of virtio-mem requests through the split virtqueue, on the KVM model.

A guest (:class:`~memslots.virtio.virtqueue.DriverQueue` in boot RAM, one request and one response
buffer, as Linux's driver has) sends PLUG, STATE and UNPLUG requests for single blocks inside a
memslot that stays mapped (block 0 of the device is plugged first), so the requests measure the
queue and the device's bookkeeping, not KVM slot creation. Two times are taken:

* ``round_trip``: the guest's ``add`` + ``kick`` + ``get_used``, the device's work included;
* ``notify``: the device's ``VirtioMemTransport.notify`` alone (its kick handler),

alternating request by request.
Each time is one ``time.perf_counter_ns`` difference. With ``--runs R`` the whole measurement
runs R times on fresh machines and the medians of the runs' p50 and p99 per request type (µs)
go to ``bench/results/request_latency.{json,md}`` (each run's figures in the JSON).

With ``--baseline DIR`` (a checkout of an older commit) each run is followed by a run of that
tree's own ``bench/request_latency.py`` on its own code, in a child process, and the results
give the ratios baseline / this tree of the medians: on a shared host, only figures taken side
by side compare.

    .venv/bin/python bench/request_latency.py [--requests N] [--runs R] [--baseline DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hostinfo

from memslots.devices.virtio_mem.wire import (
    REQUEST_SIZE,
    RESPONSE_SIZE,
    ReqType,
    Request,
    Resp,
    Response,
)
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
DEVICE = "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"
QUEUE_GPA = 0x10_0000
QUEUE_BYTES = 0x1_0000
REQ_GPA = 0x20_0000
RESP_GPA = 0x20_1000
WARMUP = 1000
KINDS = (ReqType.PLUG, ReqType.STATE, ReqType.UNPLUG)

Samples = dict[str, dict[str, list[int]]]
#: p50_us, p99_us and samples, by timing (round_trip, notify), by request type.
Results = dict[str, dict[str, dict[str, float]]]


def percentile(values: list[int], q: float) -> float:
    """The ``q`` quantile (nearest rank) of nanosecond samples, in µs."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def measure(requests: int) -> Samples:
    """Nanoseconds per request, by request type and by what was timed."""
    config = parse_machine_config(MEMORY, [BACKEND], [DEVICE], accel="sim")
    samples: Samples = {k.name: {"round_trip": [], "notify": []} for k in KINDS}
    with Machine(config) as machine:
        dev = machine.virtio_mem("vmem0")
        memory = GuestMemory(machine.address_space)
        transport = VirtioMemTransport(dev, memory)
        queue = DriverQueue(memory, QUEUE_GPA, QUEUE_BYTES, notify=transport.notify)
        transport.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        transport.write_driver_features(transport.device_features)
        transport.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        transport.setup_queue(queue.num, queue.desc_gpa, queue.avail_gpa, queue.used_gpa)
        transport.write_status(
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
        )
        dev.set_requested_size(1 * GiB)
        bs = dev.block_size
        per_slot = dev.memslot_size // bs
        out = [(REQ_GPA, REQUEST_SIZE)]
        in_ = [(RESP_GPA, RESPONSE_SIZE)]
        notify_ns: list[int] = []

        def timed_notify() -> None:
            t0 = time.perf_counter_ns()
            transport.notify()
            notify_ns.append(time.perf_counter_ns() - t0)

        def send(kind: ReqType, block: int) -> int:
            memory.write(REQ_GPA, Request(kind, dev.addr + block * bs, 1).pack())
            t0 = time.perf_counter_ns()
            queue.add(out, in_)
            queue.kick()
            used = queue.get_used()
            elapsed = time.perf_counter_ns() - t0
            resp = Response.unpack(memory.read(RESP_GPA, RESPONSE_SIZE))
            if used is None or resp.type != Resp.ACK:
                raise SystemExit(f"{kind.name} of block {block}: {resp} ({transport.error})")
            return elapsed

        send(ReqType.PLUG, 0)
        # Round trips and notify times alternate, so that both see the same host conditions.
        for i in range(2 * (WARMUP + requests)):
            timing_notify = i % 2 == 1
            queue.notify = timed_notify if timing_notify else transport.notify
            # Blocks 1.. of memslot 0: block 0 stays plugged, so the memslot stays mapped.
            block = 1 + i % (per_slot - 1)
            for kind in KINDS:
                elapsed = send(kind, block)
                if i >= 2 * WARMUP:
                    what = "notify" if timing_notify else "round_trip"
                    samples[kind.name][what].append(notify_ns[-1] if timing_notify else elapsed)
        if dev.mapped_memslots != 1 or machine.kvm.creates != 2:
            raise SystemExit("a measured request created or deleted a KVM memslot")
    return samples


def summarize(samples: Samples) -> Results:
    """p50 and p99 in µs, and the sample count."""
    return {
        kind: {
            what: {
                "p50_us": round(percentile(v, 0.5), 2),
                "p99_us": round(percentile(v, 0.99), 2),
                "samples": len(v),
            }
            for what, v in per.items()
        }
        for kind, per in samples.items()
    }


def median_of_runs(runs: list[Results]) -> Results:
    """Per request type and timing: the median of the runs' p50 and p99, all samples."""
    first = runs[0]
    return {
        kind: {
            what: {
                "p50_us": round(statistics.median(r[kind][what]["p50_us"] for r in runs), 2),
                "p99_us": round(statistics.median(r[kind][what]["p99_us"] for r in runs), 2),
                "samples": sum(r[kind][what]["samples"] for r in runs),
            }
            for what in per
        }
        for kind, per in first.items()
    }


def measure_baseline(tree: Path, requests: int) -> Results:
    """One run of ``tree``'s own benchmark on ``tree``'s code; its results."""
    with tempfile.TemporaryDirectory(prefix="request-latency-") as out:
        subprocess.run(
            [sys.executable, "bench/request_latency.py", "--requests", str(requests), "--out", out],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        results: Results = json.loads((Path(out) / "request_latency.json").read_text())["results"]
    return results


def ratios(ours: Results, baseline: Results) -> dict[str, dict[str, float]]:
    """Per request type and timing: baseline p50 / our p50."""
    return {
        kind: {
            what: round(baseline[kind][what]["p50_us"] / t["p50_us"], 2) for what, t in per.items()
        }
        for kind, per in ours.items()
    }


def markdown(results: Results, meta: dict[str, Any], baseline: Results | None = None) -> str:
    """The results as a Markdown table with the command and the host."""
    lines = [
        "# virtio-mem request latency through the split virtqueue (KVM model)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{hostinfo.sentence(meta)}; median of {meta['runs']} run(s).",
        f"Machine: `-m {MEMORY} -object {BACKEND} -device {DEVICE}`; single-block requests "
        "inside memslot 0, which stays mapped.",
        "",
        "| request | round trip p50 (µs) | round trip p99 (µs) | notify p50 (µs) "
        "| notify p99 (µs) | samples |",
        "|---|---|---|---|---|---|",
    ]
    for kind, per in results.items():
        rt, nt = per["round_trip"], per["notify"]
        lines.append(
            f"| {kind} | {rt['p50_us']} | {rt['p99_us']} | {nt['p50_us']} | {nt['p99_us']} "
            f"| {int(nt['samples'])} |"
        )
    if baseline is not None:
        lines += [
            "",
            f"Baseline: `{meta['baseline']}` (its own benchmark, a run after each of ours).",
            "",
            "| request | round trip p50 (µs): baseline / this tree | ratio "
            "| notify p50 (µs): baseline / this tree | ratio |",
            "|---|---|---|---|---|",
        ]
        for kind, ratio in ratios(results, baseline).items():
            cells = [
                f"{baseline[kind][what]['p50_us']} / {results[kind][what]['p50_us']} "
                f"| {ratio[what]}"
                for what in ("round_trip", "notify")
            ]
            lines.append(f"| {kind} | {' | '.join(cells)} |")
    lines += [
        "",
        "round trip: the guest's add + kick + get_used (the device's work included); "
        "notify: the device's kick handler alone.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark, print the results and write them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests of each type")
    parser.add_argument("--runs", type=int, default=1, help="measurements (medians are reported)")
    parser.add_argument("--baseline", type=Path, help="a checkout to measure too, alternately")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", *sys.argv])
    load_start = hostinfo.loadavg()
    runs: list[Results] = []
    baseline_runs: list[Results] = []
    for _ in range(args.runs):
        runs.append(summarize(measure(args.requests)))
        if args.baseline is not None:
            baseline_runs.append(measure_baseline(args.baseline, args.requests))
    results = median_of_runs(runs)
    baseline = median_of_runs(baseline_runs) if baseline_runs else None
    meta = {
        "command": command,
        **hostinfo.record(load_start),
        "runs": args.runs,
    }
    report: dict[str, object] = {"meta": meta, "results": results, "runs": runs}
    if baseline is not None:
        meta["baseline"] = str(args.baseline)
        report |= {
            "baseline": baseline,
            "baseline_runs": baseline_runs,
            "ratios_p50": ratios(results, baseline),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "request_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(results, meta, baseline)
    (args.out / "request_latency.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'request_latency.json'} and {args.out / 'request_latency.md'}")


if __name__ == "__main__":
    main()
