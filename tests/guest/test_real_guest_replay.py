"""The guest model replays the request streams a real Linux 6.1 guest sent (bench/real_guest.py).

``bench/results/real_guest.json`` holds, per sequence, the requests QEMU traced from a real guest
at each step of a resize trace; the model must send exactly those, in order, with the same
answers, on the same machine and trace (the real run's step times, so retry timers see the
same gaps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memslots.guest.linux import GuestOptions, Online
from memslots.options import TraceStep, parse_machine_config
from memslots.simulate.run import run_simulation
from memslots.sizes import MiB

RECORDED = Path(__file__).resolve().parents[2] / "bench" / "results" / "real_guest.json"
SEQUENCES: dict[str, Any] = json.loads(RECORDED.read_text())["sequences"]
#: The real run's machine (bench/real_guest.py), the device options per sequence.
MEMORY = "4G,maxmem=8G"
BACKEND = "memory-backend-ram,id=mem0,size=2G"


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_model_sends_what_the_real_guest_sent(name: str) -> None:
    seq = SEQUENCES[name]
    real = seq["real"]["steps"]
    config = parse_machine_config(
        MEMORY, [BACKEND], [f"virtio-mem,id=vmem0,memdev=mem0{seq['devopts']}"], accel="sim"
    )
    trace = [TraceStep(s["time"], s["requested_mib"] * MiB) for s in real]
    result = run_simulation(
        config,
        trace,
        request_log=True,
        guest_options=GuestOptions(boot_memory_end=0, online=Online(seq["online"])),
    )
    assert result.violations == []
    assert len(result.steps) == len(real)
    for i, (model, recorded) in enumerate(zip(result.steps, real, strict=True)):
        assert model.request_log == recorded["requests"], f"{name}, step {i}"
        assert model.plugged == recorded["size_mib"] * MiB, f"{name}, step {i}"
