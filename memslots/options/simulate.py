"""``memslots simulate``'s options: a resize trace (CSV of ``time,requested-size`` rows), the
exposure strategies (``single``, ``dynamic``, ``fixed:SIZE``) and the guest's pinned offsets."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable
from dataclasses import dataclass

from memslots.errors import OptionError
from memslots.options.machine import MachineConfig, VirtioMemOptions
from memslots.sizes import parse_size


@dataclass(frozen=True)
class TraceStep:
    """At ``time`` seconds, ask for ``requested`` bytes."""

    time: float
    requested: int


def parse_trace(text: str, *, source: str = "trace") -> list[TraceStep]:
    """Parse ``time,requested-size`` rows (a header row and ``#`` comments are allowed)."""
    steps: list[TraceStep] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
            continue
        if len(row) != 2:
            raise OptionError(f"{source}:{lineno}: expected 'time,requested-size', got {row!r}")
        t_raw, size_raw = row[0].strip(), row[1].strip()
        if lineno == 1 and not t_raw.replace(".", "", 1).isdigit():
            continue  # a header row
        try:
            t = float(t_raw)
        except ValueError:
            raise OptionError(f"{source}:{lineno}: time '{t_raw}' is not a number") from None
        try:
            size = parse_size(size_raw, what="requested-size")
        except OptionError as exc:
            raise OptionError(f"{source}:{lineno}: {exc}") from exc
        if t < 0 or (steps and t < steps[-1].time):
            raise OptionError(f"{source}:{lineno}: times must be non-negative and ascending")
        steps.append(TraceStep(t, size))
    if not steps:
        raise OptionError(f"{source}: the trace has no steps")
    return steps


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
