"""Evaluation: keep emptied memslots mapped for a grace period vs QEMU's unmap-at-once.

Runs ``memslots simulate``'s built-in ``sawtooth`` and ``burst`` scenarios (the default
machine: a 256 GiB virtio-mem device with dynamic memslots, i.e. 256 memslots of 1 GiB, traces
up to 64 GiB, a step every 60 s) on the KVM model with the Linux guest model, once per
``x-unmap-grace-ms`` value (0 is QEMU's behaviour) and per KVM SLOT_ZAP_ALL setting, and
records memslot creates and deletes, the kernel metadata integrated over time, and the unmap
cost the model predicts (delete plus re-fault, for a guest using 2048 frames).

Every trace gets one more step, 600 s after its last, at the same size: memslots whose unmap a
grace period delayed past the end are unmapped (and counted) inside the window, and the
metadata they hold meanwhile is charged, so postponed deletes do not look like saved ones.

    .venv/bin/python bench/unmap_policy.py [--graces 0,10,60,120,300] [--period 60]

Writes bench/results/unmap_policy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from memslots.kvm.cost import DEFAULT_WORKING_SET_FRAMES
from memslots.options import parse_machine_config
from memslots.simulate.run import (
    DEFAULT_SIM_MAX,
    DEFAULT_SIM_MEMORY,
    DEFAULT_SIM_OBJECT,
    TraceStep,
    run_simulation,
    scenario,
)

RESULTS = Path(__file__).parent / "results"
DEVICE = "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"
SETTLE = 600.0


def evaluate(
    scenarios: Sequence[str],
    graces: Sequence[float],
    *,
    period: float = 60.0,
    working_set: int = DEFAULT_WORKING_SET_FRAMES,
) -> list[dict[str, object]]:
    """One row per (scenario, quirk, grace) with the run's summary."""
    rows: list[dict[str, object]] = []
    for name in scenarios:
        trace = scenario(name, DEFAULT_SIM_MAX, 2 << 20, period=period)
        trace = [*trace, TraceStep(trace[-1].time + SETTLE, trace[-1].requested)]
        for quirk in ("off", "on"):
            for grace in graces:
                device = DEVICE + (f",x-unmap-grace-ms={round(grace * 1000)}" if grace else "")
                config = parse_machine_config(
                    DEFAULT_SIM_MEMORY,
                    [DEFAULT_SIM_OBJECT],
                    [device],
                    accel=f"sim,slot-zap-all={quirk}",
                )
                result = run_simulation(config, trace, working_set_frames=working_set)
                if result.violations:
                    raise RuntimeError(f"{name}, grace {grace}: {result.violations[0]}")
                summary = result.summary()
                rows.append(
                    {
                        "scenario": name,
                        "slot_zap_all": quirk,
                        "grace_seconds": grace,
                        "memslot_creates": summary["memslot_creates"],
                        "memslot_deletes": summary["memslot_deletes"],
                        "metadata_gib_seconds": float(summary["kernel_metadata_byte_seconds"])  # type: ignore[arg-type]
                        / (1 << 30),
                        "metadata_peak_bytes": summary["kernel_metadata_peak_bytes"],
                        "unmap_cost_ms": summary["unmap_cost_ms"],
                    }
                )
    return rows


def _relative(rows: list[dict[str, object]]) -> None:
    """Add each row's change against QEMU's policy (grace 0) of the same scenario and quirk."""
    base = {(r["scenario"], r["slot_zap_all"]): r for r in rows if r["grace_seconds"] == 0}
    for r in rows:
        b = base[(r["scenario"], r["slot_zap_all"])]
        for key in ("memslot_deletes", "metadata_gib_seconds", "unmap_cost_ms"):
            old, new = float(b[key]), float(r[key])  # type: ignore[arg-type]
            r[f"{key}_change"] = (new - old) / old if old else 0.0


def markdown(rows: list[dict[str, object]], command: str) -> str:
    """bench/results/unmap_policy.md."""
    lines = [
        "# Grace period before unmapping an emptied memslot vs QEMU's unmap-at-once",
        "",
        "Model run (KVM model + Linux guest model), default `simulate` machine (256 GiB device, "
        "1 GiB dynamic memslots), built-in scenarios to 64 GiB, a step every 60 s, plus a "
        f"settle step {SETTLE:.0f} s after the last; unmap cost for a guest using "
        f"{DEFAULT_WORKING_SET_FRAMES} frames. Changes are against grace 0 (QEMU).",
        "",
        "| scenario | slot-zap-all | grace | creates | deletes | metadata x time "
        "| unmap cost | deletes | metadata x time | unmap cost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['slot_zap_all']} | {r['grace_seconds']:g} s "
            f"| {r['memslot_creates']} | {r['memslot_deletes']} "
            f"| {float(r['metadata_gib_seconds']):.1f} GiB*s "  # type: ignore[arg-type]
            f"| {float(r['unmap_cost_ms']):.0f} ms "  # type: ignore[arg-type]
            f"| {float(r['memslot_deletes_change']):+.0%} "  # type: ignore[arg-type]
            f"| {float(r['metadata_gib_seconds_change']):+.0%} "  # type: ignore[arg-type]
            f"| {float(r['unmap_cost_ms_change']):+.0%} |"  # type: ignore[arg-type]
        )
    lines += ["", f"Command: `.venv/bin/python {command}`"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--graces", default="0,10,60,120,300", help="Seconds, comma-separated.")
    parser.add_argument("--period", type=float, default=60.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    graces = [float(g) for g in args.graces.split(",")]
    if 0 not in graces:
        graces.insert(0, 0.0)
    rows = evaluate(("sawtooth", "burst"), graces, period=args.period)
    _relative(rows)
    command = " ".join(["bench/unmap_policy.py", *(argv if argv is not None else sys.argv[1:])])
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "unmap_policy.json").write_text(
            json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
        )
        (RESULTS / "unmap_policy.md").write_text(markdown(rows, command))
    print(markdown(rows, command), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
