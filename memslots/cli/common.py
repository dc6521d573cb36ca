"""What the commands share: the QEMU-style machine options, size options, the consoles and the
format of durations."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from memslots.errors import MemslotsError, OptionError
from memslots.kvm.cost import DEFAULT_WORKING_SET_FRAMES
from memslots.options import decimal_integer, decimal_number, parse_size

F = TypeVar("F", bound=Callable[..., Any])


class IntRange(click.IntRange):
    """click's IntRange on ASCII decimal digits only (int() also takes "٤" and "1_0")."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The user's text through :func:`decimal_integer`, then click's range check."""
        if isinstance(value, str):
            try:
                value = decimal_integer(value)
            except ValueError:
                self.fail(f"{value!r} is not a valid integer.", param, ctx)
        return super().convert(value, param, ctx)


class FloatRange(click.FloatRange):
    """click's FloatRange on finite ASCII decimal numbers only (float() also takes "nan")."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The user's text through :func:`decimal_number`, then click's range check."""
        if isinstance(value, str):
            try:
                value = decimal_number(value)
            except ValueError:
                self.fail(f"{value!r} is not a valid number.", param, ctx)
        return super().convert(value, param, ctx)


err = Console(stderr=True)


def table_console(*, wide: bool = False) -> Console:
    """Standard output for tables: the terminal's width (80 columns in a pipe); ``wide`` lets
    a table be as wide as its columns need."""
    return Console(width=1000) if wide else Console()


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
    type=IntRange(min=0),
    default=DEFAULT_WORKING_SET_FRAMES,
    show_default=True,
    metavar="FRAMES",
    help="Frames (2 MiB guest pages, one 4 KiB page used in each) the guest keeps using, for "
    "the unmap-cost model: with slot-zap-all=on every memslot delete makes it re-fault them.",
)


def example(*lines: str) -> str:
    """A ``--help`` epilog: an example command, kept as written (click rewraps otherwise)."""
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


#: The README's machine: 4 GiB of RAM and a 1 TiB virtio-mem device with dynamic memslots.
EXAMPLE_MACHINE = (
    "-m 4G,maxmem=1028G \\",
    "    -object memory-backend-ram,id=mem0,size=1T,reserve=off \\",
    "    -device virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
)


wide_option = click.option(
    "--wide", is_flag=True, help="Every column, however wide the table gets (default: 80)."
)


def check_output_path(flag: str, path: Path, *, directory: bool) -> None:
    """Refuse an output path that cannot be written, before a command does its work: a file in a
    directory that is missing or not writable, a directory where a file is (or the reverse)."""
    if directory and path.exists() and not path.is_dir():
        raise OptionError(f"{flag} {path}: not a directory")
    if not directory and path.is_dir():
        raise OptionError(f"{flag} {path}: is a directory")
    # A directory is made with its parents; a file needs its directory to exist.
    parent = path if directory else path.parent
    while directory and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{flag} {path}: directory {parent} is not writable")


def size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except MemslotsError as exc:
        raise click.BadParameter(str(exc)) from exc
