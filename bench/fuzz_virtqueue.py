"""Fuzz virtio-mem's request queue with a hostile guest (see memslots/fuzz.py).

    .venv/bin/python bench/fuzz_virtqueue.py --seconds 3600 --seed 1

Runs until ``--seconds`` pass or ``--inputs`` inputs ran, or the first oracle failure; prints
the throughput and what the device answered and refused. Exits with status 1 on a failure,
whose message names the input index: ``--seed S --inputs N+1`` replays it.
"""

from __future__ import annotations

import argparse
import sys

from memslots.testing.fuzz import QueueFuzzer


def main() -> int:
    """Run the fuzzer; 0 if no failure was found."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    parser.add_argument("--inputs", type=int, default=None, help="stop after this many inputs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (runs are repeatable)")
    args = parser.parse_args()
    with QueueFuzzer(args.seed) as fuzzer:
        report = fuzzer.run(inputs=args.inputs, seconds=args.seconds)
    print(report.summary())
    for failure in report.failures:
        print(failure, file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
