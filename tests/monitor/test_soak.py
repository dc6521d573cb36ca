"""CI's two minutes of ``bench/soak.py``: ``memslots run`` on real KVM with the probe vCPU, a
1 TiB virtio-mem device and qemu-storage-daemon, resized on a random trace while clients query,
metrics are scraped and the back-end is killed and restarted; every step checked from inside
the guest, the process's counters flat after the warm-up (the README reports a 30-minute run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import requires_kvm, requires_memcg, requires_qsd, slow

BENCH = Path(__file__).parents[2] / "bench" / "soak.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@slow
@requires_kvm
@requires_memcg
@requires_qsd
@pytest.mark.timeout(1200)
def test_two_minute_soak(tmp_path: Path) -> None:
    bench = _bench()
    opts = bench.SoakOptions(
        minutes=2, sample_every=20, warmup=40, backend_every=40, seed=7, out=tmp_path
    )
    report = bench.soak(opts, "tests/monitor/test_soak.py")
    verdict, tally = report["verdict"], report["tally"]
    assert not tally["failures"], tally["failures"]
    assert verdict["pass"], (verdict, (tmp_path / "soak.md").read_text())
    # faults of both kinds were injected, each loss and return reported
    assert tally["backend_kills"] >= 2 and tally["client_faults"] > 0
    states = [e["state"] for e in tally["events"]]
    assert states == ["disconnected", "connected"] * tally["backend_kills"]
    assert tally["checked"] > 0 and report["samples"][-1]["requests"] > 0
    assert (tmp_path / "soak.json").exists()
