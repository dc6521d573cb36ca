"""The host a benchmark ran on, as its results record it.

The host is shared (other work runs beside the benchmarks), so results record the load average
with the machine: a figure taken under load is worth less than one taken on an idle host.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The host CPU's model name, if /proc/cpuinfo says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """CPU model, CPU count and kernel, e.g. ``AMD EPYC, 2 CPUs, Linux 6.18.44``."""
    return f"{cpu_model()}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``1.02 0.87 0.40``."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def record(load_start: str) -> dict[str, Any]:
    """What a report records of where and when it ran, given the load average at its start."""
    return {
        "host": describe(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "loadavg": {"start": load_start, "end": loadavg()},
    }


def sentence(report: dict[str, Any]) -> str:
    """The Markdown line for a report's :func:`record` fields."""
    load = report["loadavg"]
    return (
        f"Host: {report['host']}; Python {report['python']}; {report['date']}; load average "
        f"{load['start']} at the start, {load['end']} at the end"
    )
