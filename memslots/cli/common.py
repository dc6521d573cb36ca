"""What the commands share: the QEMU-style machine options, size options, the consoles and the
format of durations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from memslots.errors import MemslotsError
from memslots.kvm.cost import DEFAULT_WORKING_SET_FRAMES
from memslots.options import parse_size

F = TypeVar("F", bound=Callable[..., Any])

err = Console(stderr=True)


def table_console() -> Console:
    """Standard output for tables: the terminal's width, or a wide page when piped."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def machine_options(f: F) -> F:
    """The QEMU-style options every machine-building command takes."""
    f = click.option(
        "-m",
        "memory",
        metavar="SIZE[,slots=N][,maxmem=SIZE]",
        default="128M",
        show_default=True,
        help="Boot RAM and maximum memory, as QEMU's -m.",
    )(f)
    f = click.option(
        "-object",
        "objects",
        multiple=True,
        metavar="memory-backend-TYPE,id=ID,...",
        help="A memory backend (ram, memfd, file), as QEMU's -object.",
    )(f)
    f = click.option(
        "-device",
        "devices",
        multiple=True,
        metavar="DRIVER,...",
        help="A memory device (virtio-mem, pc-dimm) or a vhost-user device "
        "(vhost-user-blk, vhost-user-fs), as QEMU's -device.",
    )(f)
    f = click.option(
        "-chardev",
        "chardevs",
        multiple=True,
        metavar="socket,id=ID,path=PATH",
        help="A vhost-user back-end's Unix socket, as QEMU's -chardev.",
    )(f)
    return f


accel_option = click.option(
    "-accel",
    "accel",
    default="auto",
    show_default=True,
    metavar="auto|kvm|sim[,slot-zap-all=on|off]",
    help="Real KVM, the model, or KVM when present; slot-zap-all=on keeps KVM's quirk that "
    "makes every memslot delete zap all shadow pages (default off: disabled where offered).",
)

working_set_option = click.option(
    "--working-set",
    "working_set",
    type=click.IntRange(min=0),
    default=DEFAULT_WORKING_SET_FRAMES,
    show_default=True,
    metavar="FRAMES",
    help="Frames (2 MiB guest pages, one 4 KiB page used in each) the guest keeps using, for "
    "the unmap-cost model: with slot-zap-all=on every memslot delete makes it re-fault them.",
)


def format_ms(ms: float) -> str:
    """A duration given in milliseconds, for tables: ``0.42 ms``, ``53 ms``, ``1.86 s``."""
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    return f"{ms:.2g} ms" if ms < 10 else f"{ms:.0f} ms"


def size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except MemslotsError as exc:
        raise click.BadParameter(str(exc)) from exc
