"""simulate's options: resize traces and exposure strategies."""

from __future__ import annotations

import pytest

from memslots.errors import OptionError
from memslots.options import (
    VirtioMemOptions,
    parse_machine_config,
    parse_strategy,
    parse_trace,
    with_strategy,
)
from memslots.sizes import GiB, MiB


def test_parse_trace() -> None:
    steps = parse_trace("time,requested-size\n# warm up\n0,1G\n30.5, 512M\n\n60,0\n")
    assert [(s.time, s.requested) for s in steps] == [(0, GiB), (30.5, 512 * MiB), (60, 0)]


@pytest.mark.parametrize(
    "text,match",
    [
        ("0,1G\n10,2G,3\n", ":2: expected 'time,requested-size'"),
        ("0,1G\nsoon,2G\n", ":2: time 'soon' is not a number"),
        ("0,1G\n10,lots\n", ":2: invalid requested-size 'lots'"),
        ("10,1G\n5,2G\n", ":2: times must be non-negative and ascending"),
        ("# nothing\n", "has no steps"),
    ],
)
def test_parse_trace_errors(text: str, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        parse_trace(text, source="t.csv")


def test_strategies_rewrite_the_device() -> None:
    cfg = parse_machine_config(
        "4G,maxmem=68G", ["memory-backend-ram,id=m,size=64G"], ["virtio-mem,id=v,memdev=m"]
    )
    single = with_strategy(cfg, "v", "single").devices[0]
    dyn = with_strategy(cfg, "v", "dynamic").devices[0]
    fixed = with_strategy(cfg, "v", "fixed:512M").devices[0]
    assert isinstance(single, VirtioMemOptions) and isinstance(dyn, VirtioMemOptions)
    assert isinstance(fixed, VirtioMemOptions)
    assert (single.dynamic_memslots, single.memslot_size) == (False, None)
    assert dyn.dynamic_memslots is True
    assert fixed.memslot_size == 512 * MiB
    with pytest.raises(OptionError, match="unknown strategy 'huge'"):
        parse_strategy("huge")
