"""memslots plan against Debian's real QEMU: 58 configurations of boot RAM, DIMMs and virtio-mem
devices must give the same device addresses, sizes and block sizes, or both be refused."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench" / "qemu_layout.py"


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86")
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm for QEMU")
def test_plan_matches_real_qemu() -> None:
    spec = importlib.util.spec_from_file_location("qemu_layout", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.compare_all()
    assert len(rows) >= 50
    mismatches = [(r["name"], r["qemu"], r["memslots"]) for r in rows if not r["match"]]
    assert mismatches == []
