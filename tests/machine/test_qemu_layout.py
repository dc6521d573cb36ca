"""memslots plan against Debian's real QEMU: 58 configurations of boot RAM, DIMMs and virtio-mem
devices must give the same device addresses, sizes and block sizes, or both be refused."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import requires_qemu, slow

BENCH = Path(__file__).parents[2] / "bench" / "qemu_layout.py"


@slow
@requires_qemu
def test_plan_matches_real_qemu() -> None:
    spec = importlib.util.spec_from_file_location("qemu_layout", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.compare_all()
    assert len(rows) >= 50
    mismatches = [(r["name"], r["qemu"], r["memslots"]) for r in rows if not r["match"]]
    assert mismatches == []
