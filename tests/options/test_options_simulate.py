"""simulate's options: resize traces and exposure strategies."""

from __future__ import annotations

from pathlib import Path

import pytest

from memslots.errors import OptionError
from memslots.options import (
    VirtioMemOptions,
    load_trace,
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


@pytest.mark.parametrize(
    "text,match",
    [
        ("0,1G\nnan,2G\n", ":2: time 'nan' is not a number"),
        ("0,1G\ninf,2G\n", ":2: time 'inf' is not a number"),
        ("0,1G\n\u0664,2G\n", ":2: time '\u0664' is not a number"),
        ("0,1G\n1_0,2G\n", ":2: time '1_0' is not a number"),
        ("0,1G\n" + "1" * 400 + ",2G\n", ":2: time 1111.* is beyond the longest trace"),
        ("0,1G\n10,\u0664G\n", ":2: invalid requested-size"),
        ("0,1G\n10," + "1" * 200_000 + "\n", "not a CSV file"),
        ("0,1G\n10,2G\0\n", "not a CSV file|invalid requested-size"),
    ],
    ids=lambda v: ascii(v)[:30],
)
def test_parse_trace_refuses_what_is_no_number(text: str, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        parse_trace(text, source="t.csv")


def test_load_trace_needs_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"time,size\n0,1G\n60,2G\xff\n")
    with pytest.raises(OptionError, match=r"t.csv:3: not UTF-8 text \(byte 0xff at offset 20\)"):
        load_trace(str(path))
    with pytest.raises(OptionError, match="cannot read the trace"):
        load_trace(str(tmp_path))
    path.write_text("time,size\n0,1G\n60,2G\n")
    assert [s.requested for s in load_trace(str(path))] == [GiB, 2 * GiB]
