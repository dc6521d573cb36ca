"""``memslots simulate``'s options: a resize trace (CSV of ``time,requested-size`` rows), the
exposure strategies (``single``, ``dynamic``, ``fixed:SIZE``) and the guest's pinned offsets."""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memslots.errors import OptionError
from memslots.options.machine import MachineConfig, VirtioMemOptions
from memslots.sizes import parse_size, shorten

#: The longest trace, in seconds (about 4 months): the guest's retry timer fires every 300 s at
#: most, so a stuck guest costs a pass per 300 s of simulated time, and longer adds nothing.
MAX_TRACE_SECONDS = 1e7
# Seconds in ASCII decimal: float() also takes "nan", "inf", "1_0" and "٤".
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", re.ASCII)


@dataclass(frozen=True)
class TraceStep:
    """At ``time`` seconds, ask for ``requested`` bytes."""

    time: float
    requested: int


def parse_trace(text: str, *, source: str = "trace") -> list[TraceStep]:
    """Parse ``time,requested-size`` rows (a header row and ``#`` comments are allowed).

    Times are seconds in decimal, ascending, up to :data:`MAX_TRACE_SECONDS`.
    """
    steps: list[TraceStep] = []
    try:
        for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            step = _trace_row(row, lineno, source, steps[-1].time if steps else None)
            if step is not None:
                steps.append(step)
    except csv.Error as exc:
        raise OptionError(f"{source}: not a CSV file: {exc}") from None
    if not steps:
        raise OptionError(f"{source}: the trace has no steps")
    return steps


def _trace_row(row: list[str], lineno: int, source: str, last: float | None) -> TraceStep | None:
    if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
        return None
    if len(row) != 2:
        raise OptionError(
            f"{source}:{lineno}: expected 'time,requested-size', got {shorten(repr(row), 80)}"
        )
    t_raw, size_raw = row[0].strip(), row[1].strip()
    if not _SECONDS.fullmatch(t_raw):
        if lineno == 1:
            return None  # a header row
        raise OptionError(f"{source}:{lineno}: time '{shorten(t_raw)}' is not a number")
    t = float(t_raw)
    if t > MAX_TRACE_SECONDS:
        raise OptionError(
            f"{source}:{lineno}: time {shorten(t_raw)} is beyond the longest trace "
            f"({MAX_TRACE_SECONDS:.0f} s)"
        )
    try:
        size = parse_size(size_raw, what="requested-size")
    except OptionError as exc:
        raise OptionError(f"{source}:{lineno}: {exc}") from exc
    if last is not None and t < last:
        raise OptionError(f"{source}:{lineno}: times must be non-negative and ascending")
    return TraceStep(t, size)


def load_trace(path: str) -> list[TraceStep]:
    """Read and parse a trace file, which must be UTF-8 text."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise OptionError(f"{path}: cannot read the trace: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise OptionError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    return parse_trace(text, source=path)


def parse_strategy(text: str) -> tuple[str, Callable[[VirtioMemOptions], VirtioMemOptions]]:
    """``single`` | ``dynamic`` | ``fixed:SIZE`` → a name and how to rewrite the device options."""
    if text == "single":
        return text, lambda o: dataclasses.replace(o, dynamic_memslots=False, memslot_size=None)
    if text == "dynamic":
        return text, lambda o: dataclasses.replace(o, dynamic_memslots=True, memslot_size=None)
    if text.startswith("fixed:"):
        size = parse_size(text.removeprefix("fixed:"), what="memslot size")
        return text, lambda o: dataclasses.replace(o, memslot_size=size)
    raise OptionError(f"unknown strategy '{text}' (single, dynamic, fixed:SIZE)")


def parse_strategies(compare: str | None, strategy: str) -> list[str]:
    """``--compare a,b,c`` (or the one ``--strategy``), each checked."""
    strategies = compare.split(",") if compare else [strategy]
    for s in strategies:
        parse_strategy(s)
    return strategies


def with_strategy(config: MachineConfig, dev_id: str, strategy: str) -> MachineConfig:
    """``config`` with the virtio-mem device ``dev_id`` rewritten for ``strategy``."""
    _, rewrite = parse_strategy(strategy)
    devices = tuple(
        rewrite(d) if isinstance(d, VirtioMemOptions) and d.id == dev_id else d
        for d in config.devices
    )
    return dataclasses.replace(config, devices=devices)


def first_virtio_mem(config: MachineConfig) -> str:
    """The id of the first virtio-mem device (the one a trace resizes)."""
    for d in config.devices:
        if isinstance(d, VirtioMemOptions):
            if d.id is None:
                raise OptionError("simulate: the virtio-mem device needs an id")
            return d.id
    raise OptionError("simulate: the machine has no virtio-mem device")


def parse_offsets(text: str) -> frozenset[int]:
    """``OFFSET[,OFFSET…]``: QEMU sizes, e.g. the guest's pinned sub-blocks."""
    return frozenset(parse_size(p) for p in text.split(",") if p)
