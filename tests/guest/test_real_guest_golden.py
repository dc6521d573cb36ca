"""Golden test: the 7 request streams a real Linux 6.1 guest sent (recorded by
``bench/real_guest.py`` in ``bench/results/real_guest.json``) replayed through the guest model,
compared request by request with the bench's own comparison."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner

from memslots.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
RECORDED = json.loads((ROOT / "bench" / "results" / "real_guest.json").read_text())


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("real_guest", ROOT / "bench" / "real_guest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


def memslots_in_process(argv: list[str]) -> dict[str, Any]:
    """``memslots ARGV`` through the command line's own code, in this process."""
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_the_recording_has_every_sequence() -> None:
    assert sorted(RECORDED["sequences"]) == sorted(BENCH.SEQUENCES)
    assert RECORDED["env"]["kernel"].startswith("6.1.")
    requests = sum(
        len(step["requests"])
        for seq in RECORDED["sequences"].values()
        for step in seq["real"]["steps"]
    )
    assert requests == 470


@pytest.mark.parametrize("name", sorted(RECORDED["sequences"]))
def test_model_sends_what_the_real_guest_sent(name: str, tmp_path: Path) -> None:
    seq = RECORDED["sequences"][name]
    real = seq["real"]
    devopts = seq["devopts"]
    if "block-size" not in devopts:
        # The device the real guest saw: QEMU's default block size on the recording host (its
        # THP size), stated so that the replay does not depend on this host's THP size.
        devopts += f",block-size={real['block_size']}"
    model = BENCH.run_model(
        tmp_path,
        name,
        devopts,
        seq["sizes"],
        [step["time"] for step in real["steps"]],
        seq["online"],
        memslots=memslots_in_process,
    )
    assert model["block_size"] == real["block_size"]
    assert len(model["steps"]) == len(real["steps"])
    result = BENCH.compare(real, model)
    differing = [s for s in result["steps"] if not s["match"]]
    assert result["match"], (result.get("address_mismatch"), differing)
    assert sum(s["model_n"] for s in result["steps"]) == sum(
        len(step["requests"]) for step in real["steps"]
    )
