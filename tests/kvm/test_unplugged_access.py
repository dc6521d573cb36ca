"""Issue 12 §1 on the real kernel: bench/unplugged_access.py, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import requires_kvm

BENCH = Path(__file__).parents[2] / "bench" / "unplugged_access.py"


def run_bench(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--no-write", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


@requires_kvm
def test_unplugged_access_acceptance() -> None:
    """A read and a write of an unplugged block in a mapped memslot, from the CPL3 vCPU: each
    gives the event and stops the VM, the backend's RSS does not grow, the plugged neighbour
    keeps its data; with ``unplugged-inaccessible=off`` the guest reaches the block and the
    host backs what it writes (a memfd: reads allocate too)."""
    on = run_bench()
    for access in ("read", "write"):
        assert on[access] == {"event": True, "stopped": True, "rss_growth_bytes": 0}
    assert on["plugged_neighbour_intact"] is True
    off = run_bench("--unplugged-inaccessible", "off")
    for access in ("read", "write"):
        got = off[access]
        assert isinstance(got, dict) and not got["event"] and not got["stopped"]
        assert got["rss_growth_bytes"] >= 4096
    assert off["plugged_neighbour_intact"] is True
