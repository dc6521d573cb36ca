"""Benchmark: kernel metadata and realize+plug time, single memslot vs dynamic memslots.

For a 1 TiB virtio-mem device (4 GiB boot RAM) on the real kernel, each plugged size is run
twice in the same process, dynamic-memslots=off (the baseline) and =on, and the ratios
dynamic/single are written to bench/results/memslot_cost.{json,md}.

    .venv/bin/python bench/memslot_cost.py [--device-size 1T] [--plugged 0,1G,16G,256G]

Each baseline run creates a 1 TiB memslot: about 2.5 GiB of kernel memory for a few seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

from memslots.kvm.host import detect_host_mmu
from memslots.kvm.vm import kvm_available
from memslots.measure import compare
from memslots.sizes import format_size, parse_size

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-size", default="1T")
    parser.add_argument("--plugged", default="0,1G,16G,256G")
    args = parser.parse_args()
    if not kvm_available():
        print("memslot_cost: /dev/kvm is not available; nothing to measure", file=sys.stderr)
        return 2
    device = parse_size(args.device_size)
    rows: list[dict[str, Any]] = []
    for plugged in (parse_size(p) for p in args.plugged.split(",")):
        print(
            f"{format_size(device)} device, {format_size(plugged) if plugged else '0'} plugged",
            file=sys.stderr,
        )
        rows.append(compare(device, plugged).to_json())
    report: dict[str, Any] = {
        "host": {"kernel": platform.release(), "mmu": detect_host_mmu().describe()},
        "command": " ".join(["bench/memslot_cost.py", *sys.argv[1:]]),
        "runs": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memslot_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Single memslot vs dynamic memslots ({format_size(device)} virtio-mem device)",
        "",
        f"Kernel {report['host']['kernel']}, KVM MMU: {report['host']['mmu']}.",
        "Measured: VmallocUsed rise and realize+plug wall time; ratio = dynamic / single.",
        "",
        "| plugged | single: metadata | single: time | dynamic: memslots | dynamic: metadata "
        "| dynamic: time | metadata ratio | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, d, q = r["single"], r["dynamic"], r["ratios"]
        mratio = f"{q['kernel_metadata']:.5f}" if q["kernel_metadata"] is not None else "-"
        lines.append(
            f"| {format_size(r['plugged']) if r['plugged'] else '0'} "
            f"| {format_size(s['kernel_metadata_bytes'])} | {s['seconds'] * 1e3:.1f} ms "
            f"| {d['memslots_mapped']} | {format_size(d['kernel_metadata_bytes'])} "
            f"| {d['seconds'] * 1e3:.1f} ms | {mratio} | {q['seconds']:.5f} |"
        )
    (RESULTS / "memslot_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
