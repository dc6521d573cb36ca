"""Benchmark: kernel metadata and realize+plug time, single memslot vs dynamic memslots.

For a 1 TiB virtio-mem device (4 GiB boot RAM) on the real kernel, each plugged size is run
``--repeats`` times each way in the same process, dynamic-memslots=off (the baseline) and =on,
in alternating order (single first, then dynamic first, ...), so that neither alone pays the
host's first-touch cost. Every run is measured per VM (a memory cgroup of its own, see
memslots.host.kmem; VmallocUsed, marked, where none can be made). Medians, minima, the model's
figure for the same source and the ratios dynamic/single (of medians) are written to
bench/results/memslot_cost.{json,md}.

    .venv/bin/python bench/memslot_cost.py [--device-size 1T] [--plugged 0,1G,16G,256G]
        [--repeats 3]

Each baseline run creates a 1 TiB memslot: about 2.5 GiB of kernel memory for a second or so.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

from memslots.host.kmem import SYSTEM_CAVEAT
from memslots.kvm.host import host_info
from memslots.measure import compare
from memslots.sizes import format_size, parse_size

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-size", default="1T")
    parser.add_argument("--plugged", default="0,1G,16G,256G")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not host_info().kvm:
        print("memslot_cost: /dev/kvm is not available; nothing to measure", file=sys.stderr)
        return 2
    device = parse_size(args.device_size)
    rows: list[dict[str, Any]] = []
    for plugged in (parse_size(p) for p in args.plugged.split(",")):
        print(
            f"{format_size(device)} device, {format_size(plugged) if plugged else '0'} plugged",
            file=sys.stderr,
        )
        rows.append(compare(device, plugged, repeats=args.repeats).to_json())
    report: dict[str, Any] = {
        "host": {"kernel": platform.release(), "mmu": host_info().mmu.describe()},
        "command": " ".join(["bench/memslot_cost.py", *sys.argv[1:]]),
        "runs": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memslot_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    sources = sorted({str(r["source"]) for r in rows})
    lines = [
        f"# Single memslot vs dynamic memslots ({format_size(device)} virtio-mem device)",
        "",
        f"Kernel {report['host']['kernel']}, KVM MMU: {report['host']['mmu']}.",
        f"Each layout measured {args.repeats} times, pairs in alternating order "
        "(single first, then dynamic first).",
        "Kernel figures: the rise of kernel memory from device realize to the end of the plug, "
        "with its source in brackets; "
        + str(rows[0]["source_detail"])
        + ". Medians, the minimum after a slash for times; "
        "'model' is the largest distance of any run from the model's figure for that source. "
        "Ratios are dynamic / single, of medians.",
        "",
        "| plugged | single: kernel | single: time min / median | dynamic: memslots "
        "| dynamic: kernel | dynamic: time min / median | model | kernel ratio | time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, d, q, m = r["single"], r["dynamic"], r["ratios"], r["model"]
        mratio = f"{q['kernel_metadata']:.5f}" if q["kernel_metadata"] is not None else "-"
        worst = max(
            abs(run["kernel_metadata_bytes"] - m[k]["kernel_metadata_bytes"])
            for k in ("single", "dynamic")
            for run in r[k]["runs"]
        )
        lines.append(
            f"| {format_size(r['plugged']) if r['plugged'] else '0'} "
            f"| {format_size(s['kernel_metadata_bytes'])} ({s['source']}) "
            f"| {s['seconds_min'] * 1e3:.1f} / {s['seconds'] * 1e3:.1f} ms "
            f"| {d['memslots_mapped']} "
            f"| {format_size(d['kernel_metadata_bytes'])} ({d['source']}) "
            f"| {d['seconds_min'] * 1e3:.1f} / {d['seconds'] * 1e3:.1f} ms "
            f"| within {format_size(worst)} | {mratio} | {q['seconds']:.5f} |"
        )
    if "system" in sources:
        lines += ["", f"(system): {SYSTEM_CAVEAT}."]
    (RESULTS / "memslot_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
