"""simulate: scenarios (options: tests/options; end-to-end runs: machine/test_guest_vm.py)."""

from __future__ import annotations

import pytest

from memslots.errors import OptionError
from memslots.simulate.run import scenario
from memslots.sizes import GiB, MiB


def test_scenarios() -> None:
    ramp = scenario("ramp-up", 8 * GiB, 2 * MiB, steps=4)
    assert [s.requested for s in ramp] == [0, 2 * GiB, 4 * GiB, 6 * GiB, 8 * GiB]
    saw = [s.requested for s in scenario("sawtooth", 8 * GiB, 2 * MiB, steps=4)]
    assert saw == [0, 4 * GiB, 8 * GiB, 4 * GiB, 0, 4 * GiB, 8 * GiB, 4 * GiB, 0]
    burst = [s.requested for s in scenario("burst", 16 * GiB, 2 * MiB)]
    assert max(burst) == 16 * GiB and burst[0] == GiB and burst[-1] == 0
    times = [s.time for s in ramp]
    assert times == sorted(times) and len(set(times)) == len(times)
    with pytest.raises(OptionError, match="unknown scenario 'zigzag'"):
        scenario("zigzag", GiB, 2 * MiB)
