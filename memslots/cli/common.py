"""What the commands share: the QEMU-style machine options, size options, and the consoles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from memslots.errors import MemslotsError
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
    type=click.Choice(("auto", "kvm", "sim")),
    default="auto",
    show_default=True,
    help="Real KVM, the model, or KVM when present.",
)


def size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except MemslotsError as exc:
        raise click.BadParameter(str(exc)) from exc
