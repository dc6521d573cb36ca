"""``memslots simulate`` speed: this tree against a baseline commit, on the same trace, in one run.

Runs ``memslots simulate -accel sim --scenario sawtooth --steps 10000 --json`` (the default
machine: a 256 GiB device in 1 GiB memslots, the sawtooth to 64 GiB and back twice, 20,001 trace
rows) with this tree's code and with the baseline's, alternately (ours, baseline, ours, ...),
``--repeats`` times each. The baseline is a ``git worktree`` of ``--base`` (default: the commit
before the request-path work) made in a temporary directory, unless ``--baseline DIR`` names a
checkout. Each run is a child process: its CPU time (user + system) and peak RSS are the kernel's
accounting of that child (``os.wait4``), its wall time is taken around it. Reported: medians,
and the speed-up baseline / ours as the median of the ratios of each pair (a pair runs back to
back, so a host whose speed drifts moves both). CPU time is the figure to quote on a shared
host; wall time also counts waiting for a CPU.

Both trees must produce the same steps (sizes, requests and responses by type, memslot creates
and deletes, metadata, outcome); the script checks that on every run's JSON and fails otherwise.

    .venv/bin/python bench/simulate_speed.py [--repeats 3] [--steps 10000] [--baseline DIR]

Writes bench/results/simulate_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hostinfo

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
#: The base of this work (before the guest-model, simulate and request-path changes): the code
#: the speed-up is measured against.
BASE_COMMIT = "d9bbc7514cd1fe8b0fbc31d98289b30fb7de5d5f"
#: Runs ``memslots`` from the tree given as the first argument, whatever is installed.
CHILD = (
    "import sys; tree = sys.argv.pop(1); sys.path.insert(0, tree); import memslots; "
    "assert memslots.__file__.startswith(tree), memslots.__file__; "
    "sys.argv[0] = 'memslots'; from memslots.cli.main import main; main()"
)
#: Step fields both trees must agree on (the baseline also records each step's memslot map).
COMPARED = (
    "time",
    "requested",
    "plugged",
    "memslots_mapped",
    "requests",
    "responses",
    "memslot_creates",
    "memslot_deletes",
    "kernel_metadata_bytes",
    "ideal_metadata_bytes",
    "single_metadata_bytes",
    "outcome",
    "unmap_cost_ms",
)


def scenario_args(steps: int) -> list[str]:
    """This tree's built-in sawtooth, whose steps become the trace both trees run."""
    return ["simulate", "-accel", "sim", "--scenario", "sawtooth", "--steps", str(steps), "--json"]


def write_trace(steps_json: Path, trace: Path) -> None:
    """The ``time,requested-size`` rows of a ``simulate --json`` output: the same trace for
    both trees, whatever sizes each tree's built-in scenario would pick."""
    doc = json.loads(steps_json.read_text())
    trace.write_text("".join(f"{s['time']},{s['requested']}\n" for s in doc["steps"]))


def simulate_args(trace: Path) -> list[str]:
    """The command line both trees run."""
    return ["simulate", "-accel", "sim", "--trace", str(trace), "--json"]


def run_once(tree: Path, args: list[str], out: Path) -> dict[str, float]:
    """One child run of ``memslots`` from ``tree``; CPU, wall and peak RSS of that child."""
    with out.open("wb") as stdout:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tree), *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=tree,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    if proc.returncode:
        raise SystemExit(f"{tree}: memslots {shlex.join(args)} failed:\n{err}")
    return {
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "wall_seconds": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "json_mib": out.stat().st_size / 2**20,
    }


def steps_of(path: Path) -> list[dict[str, Any]]:
    """The compared fields of every step of a ``simulate --json`` output."""
    doc = json.loads(path.read_text())
    return [{k: s[k] for k in COMPARED} for s in doc["steps"]]


@contextlib.contextmanager
def baseline_tree(given: Path | None, commit: str) -> Iterator[Path]:
    """The baseline checkout: ``given``, or a temporary worktree of ``commit``."""
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="simulate-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit],
            check=True,
            capture_output=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                check=True,
                capture_output=True,
            )


def summarize(ours: list[dict[str, float]], base: list[dict[str, float]]) -> dict[str, Any]:
    """Medians per tree and the pairwise speed-ups (baseline / ours)."""

    def med(runs: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    return {
        "ours": med(ours),
        "baseline": med(base),
        "speedup_cpu": statistics.median(
            b["cpu_seconds"] / o["cpu_seconds"] for o, b in zip(ours, base, strict=True)
        ),
        "speedup_wall": statistics.median(
            b["wall_seconds"] / o["wall_seconds"] for o, b in zip(ours, base, strict=True)
        ),
    }


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    s = report["summary"]
    rows = report["trace_rows"]
    lines = [
        "# `memslots simulate` speed: this tree vs the baseline, same trace, same run",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{hostinfo.sentence(report)}.",
        f"Simulated: `memslots {shlex.join(report['args'])}` ({rows} trace rows); baseline "
        f"`{report['base_commit'][:12]}`; {report['repeats']} runs each, alternating; medians.",
        "",
        "| tree | CPU (s) | CPU per row (ms) | wall (s) | peak RSS (MiB) | JSON (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("baseline", "ours"):
        m = s[name]
        lines.append(
            f"| {name} | {m['cpu_seconds']:.2f} | {1e3 * m['cpu_seconds'] / rows:.3f} "
            f"| {m['wall_seconds']:.2f} | {m['peak_rss_mib']:.0f} | {m['json_mib']:.1f} |"
        )
    lines += [
        "",
        f"Speed-up (baseline / ours, median of pairs): **{s['speedup_cpu']:.2f}x CPU**, "
        f"{s['speedup_wall']:.2f}x wall. Both trees produced the same {rows} steps in every run.",
        "",
        "Same command line, so each tree writes its default JSON: the baseline's has each step's "
        "memslot map, which this tree records only with `--memslot-map` (hence the JSON sizes).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    """Run both trees alternately, check they agree, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tree")
    parser.add_argument("--steps", type=int, default=10_000, help="the scenario's --steps")
    parser.add_argument("--base", default=BASE_COMMIT, help="baseline commit")
    parser.add_argument("--baseline", type=Path, help="a checkout to use as the baseline")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_start = hostinfo.loadavg()
    ours: list[dict[str, float]] = []
    base: list[dict[str, float]] = []
    with (
        baseline_tree(args.baseline, args.base) as tree,
        tempfile.TemporaryDirectory() as tmp,
    ):
        # Untimed: the trace itself (the baseline's sawtooth picked other sizes).
        scenario_json, trace = Path(tmp) / "scenario.json", Path(tmp) / "trace.csv"
        run_once(REPO, scenario_args(args.steps), scenario_json)
        write_trace(scenario_json, trace)
        sim = simulate_args(trace)
        for i in range(args.repeats):
            for tag, root, runs in (("ours", REPO, ours), ("baseline", tree, base)):
                out = Path(tmp) / f"{tag}.json"
                runs.append(run_once(root, sim, out))
                got = steps_of(out)
                if tag == "ours":
                    reference = got
                elif got != reference:
                    raise SystemExit(f"run {i}: the trees disagree on the simulated steps")
                print(f"run {i + 1} {tag}: {runs[-1]}", file=sys.stderr)
    report = {
        "command": shlex.join([".venv/bin/python", "bench/simulate_speed.py", *sys.argv[1:]]),
        **hostinfo.record(load_start),
        "args": sim,
        "trace_rows": len(reference),
        "base_commit": args.base,
        "repeats": args.repeats,
        "runs": {"ours": ours, "baseline": base},
        "summary": summarize(ours, base),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "simulate_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "simulate_speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
