"""The ``memslots`` command: QEMU-style options, tables for people, ``--json`` for programs.

Errors are handled in one place, :class:`MemslotsCli`: every :class:`MemslotsError` prints
``memslots: <message>`` and exits with the status its class carries, click's usage errors exit
with 1 (bad input), and ``--help`` lists the table (:data:`memslots.errors.EXIT_CODES`).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any

import click

from memslots.cli.monitor import info, migrate, qmp_command, resize, run
from memslots.cli.plan import demo, measure, plan
from memslots.cli.simulate import simulate
from memslots.errors import EXIT_BAD_INPUT, EXIT_CODES, MemslotsError


class MemslotsCli(click.Group):
    """The ``memslots`` group, with the one handler that maps errors to messages and exit
    statuses (:data:`memslots.errors.EXIT_CODES`)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run a command; errors end the process here and nowhere else."""
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.ClickException as exc:
            # Said like every other error; usage errors are bad input (click would exit 2).
            click.echo(f"memslots: {exc.format_message()}", err=True)
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                ctx = exc.ctx
                click.echo(
                    f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", err=True
                )
            sys.exit(EXIT_BAD_INPUT)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except MemslotsError as exc:
            # Never wrapped, so that QEMU's text can be matched.
            click.echo(f"memslots: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            # Output piped into a reader that went away (| head): stop quietly, as click does;
            # the interpreter's last flush then goes nowhere instead of failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_BAD_INPUT)


EXIT_STATUS_HELP = "\b\nExit status:\n" + "\n".join(
    f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items()
)


class _QemuStyleFormatter(logging.Formatter):
    """``memslots: warning: text``, as QEMU prints its warnings."""

    def format(self, record: logging.LogRecord) -> str:
        return f"memslots: {record.levelname.lower()}: {record.getMessage()}"


@click.group(cls=MemslotsCli, epilog=EXIT_STATUS_HELP)
@click.version_option(package_name="memslots")
def main() -> None:
    """virtio-mem through many small memslots, mapped only while memory in them is plugged."""
    root = logging.getLogger("memslots")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_QemuStyleFormatter())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


for command in (plan, measure, simulate, run, qmp_command, resize, info, migrate, demo):
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
