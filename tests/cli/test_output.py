"""Output for people (issue 8.5): tables fit 80 columns with every value whole, one unit per
column, an example in every verb's --help."""

from __future__ import annotations

import io
import re

import pytest
from click.testing import CliRunner
from qmp_support import make_machine
from rich.console import Console
from rich.table import Table

from memslots.cli import main as cli
from memslots.guest.inorder import drive_to
from memslots.monitor.client import budget_tables, devices_table, memslots_table
from memslots.reports import budget_report, memslot_report, to_qmp
from memslots.sizes import MiB

WIDTH = 80
README_MACHINE = [
    "-m",
    "4G,maxmem=1030G,slots=2",
    "-object",
    "memory-backend-ram,id=mem0,size=1T,reserve=off",
    "-device",
    "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
    "-object",
    "memory-backend-ram,id=d,size=512M",
    "-device",
    "pc-dimm,id=dimm0,memdev=d",
]


def invoke(args: list[str]) -> str:
    result = CliRunner(env={"COLUMNS": str(WIDTH)}).invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def assert_fits(text: str) -> None:
    long = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not long, "\n".join(long)
    assert "…" not in text  # nothing ellipsized to make it fit


def render(table: Table, width: int = WIDTH) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False).print(table)
    return buf.getvalue()


def header_units(text: str) -> list[str]:
    return re.findall(r"\((B|KiB|MiB|GiB|TiB|ms|s)\)", text)


def test_plan_fits_80_columns_with_every_value_whole() -> None:
    out = invoke(["plan", *README_MACHINE, "--cpu-vendor", "intel", "--phys-bits", "48"])
    assert_fits(out)
    vmem0 = next(line for line in out.splitlines() if line.startswith(" vmem0"))
    assert vmem0.split()[1] == "0x140000000"  # whole, not wrapped
    assert "2571.03" in vmem0  # one memslot's metadata, in the column's MiB
    assert "(GiB)" in out and "(MiB)" in out and "(ms)" in out
    assert "dynamic" not in out and "block" not in out  # details left to --wide
    wide = invoke(["plan", *README_MACHINE, "--wide"])
    assert "virtio-mem (dynamic)" in wide and "block" in wide


def test_simulate_fits_80_columns() -> None:
    out = invoke(
        ["simulate", "-accel", "sim", "--scenario", "burst", "--compare", "single,fixed:128M"]
    )
    assert_fits(out)
    assert "fixed:128M" in out  # the strategy's name, whole
    for line in out.splitlines():
        # one unit per column: a cell is a bare number, the unit is in the header
        assert not re.search(r"\d (GiB|MiB|ms)\b", line) or "(" in line or ":" in line, line
    assert "requests" not in out.split("Kernel metadata")[0]  # --wide adds them
    assert "requests" in invoke(["simulate", "-accel", "sim", "--steps", "1", "--wide"])


def test_simulate_says_why_the_guest_stopped_short(tmp_path: object) -> None:
    out = invoke(
        [
            "simulate",
            "-accel",
            "sim",
            "-m",
            "4G,maxmem=68G",
            "-object",
            "memory-backend-ram,id=mem0,size=64G,reserve=off",
            "-device",
            "virtio-mem,id=vmem0,memdev=mem0,block-size=1M",
            "--max-size",
            "5M",
            "--steps",
            "1",
            "--scenario",
            "ramp-up",
        ]
    )
    assert_fits(out)
    # The scenario steps in whole Linux memory blocks (128 MiB here): 5 MiB asks for 0.
    assert "stopped short" not in out
    trace = tmp_path / "t.csv"  # type: ignore[operator]
    trace.write_text("time,size\n0,0\n60,5M\n")
    out = invoke(
        [
            "simulate",
            "-accel",
            "sim",
            "-m",
            "4G,maxmem=68G",
            "-object",
            "memory-backend-ram,id=mem0,size=64G,reserve=off",
            "-device",
            "virtio-mem,id=vmem0,memdev=mem0,block-size=1M",
            "--trace",
            str(trace),
        ]
    )
    assert_fits(out)
    assert "t=60s: plugged 4 MiB of 5 MiB requested: the rest (1 MiB) is less than one" in (
        " ".join(out.split())
    )


def test_demo_fits_80_columns() -> None:
    out = invoke(["demo", "-accel", "sim"])
    assert_fits(out)
    assert header_units(out) == ["GiB", "GiB", "MiB"]


def test_info_tables_fit_80_columns() -> None:
    with make_machine() as m:
        drive_to(m.virtio_mem("vmem0"), 1536 * MiB)
        devices = [d.info() for d in m.memory_devices]
        slots = to_qmp(memslot_report(m))
        budget = to_qmp(budget_report(m))
    for table in (
        devices_table(devices),
        memslots_table(slots),
        memslots_table(slots, show_all=True),
        *budget_tables(budget),
    ):
        assert_fits(render(table))
    assert "/objects/mem0" in render(devices_table(devices, wide=True), width=200)
    mapped = render(memslots_table(slots))
    assert mapped.count("vmem0") == 2 and "6 unmapped not shown (--all)" in mapped
    assert render(memslots_table(slots, show_all=True)).count("vmem0") == 8


@pytest.mark.parametrize("verb", sorted(cli.main.commands))
def test_every_verb_has_an_example(verb: str) -> None:
    out = invoke([verb, "--help"])
    assert "Example:" in out
    example = out.split("Example:")[1]
    assert f"memslots {verb}" in example
    assert max(len(line) for line in out.splitlines()) <= WIDTH
