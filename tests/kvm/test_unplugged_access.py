"""Issue 12 §1: what KVM_RUN's EFAULT was about, and bench/unplugged_access.py on the real
kernel, run as a user would."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from conftest import requires_kvm

from memslots.kvm.vcpu import efault_cause

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


def test_efault_cause_prefers_the_kernels_memory_fault_exit() -> None:
    """This kernel leaves exit reason 0 on EFAULT (the command is the answer); a kernel that
    fills KVM_EXIT_MEMORY_FAULT names the page, and the command's access if it lies there."""
    run = bytearray(4096)
    command = (0x1_0000_0040, 8, "write")
    assert efault_cause(run, command) == (0x1_0000_0040, 8, "write", "efault")
    assert efault_cause(run, None) is None
    struct.pack_into("=I", run, 8, 39)
    struct.pack_into("=QQQ", run, 32, 0, 0x1_0000_0000, 4096)
    assert efault_cause(run, command) == (0x1_0000_0000, 4096, "write", "memory-fault-exit")
    elsewhere = (0x2_0000_0000, 1, "read")
    assert efault_cause(run, elsewhere) == (0x1_0000_0000, 4096, None, "memory-fault-exit")
