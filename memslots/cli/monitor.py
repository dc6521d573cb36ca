"""``memslots run`` (the machine with a QMP monitor) and the client side: ``qmp``, ``resize``,
``info`` and ``migrate``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import click

from memslots.cli.common import (
    EXAMPLE_MACHINE,
    FloatRange,
    IntRange,
    accel_option,
    example,
    machine_options,
)
from memslots.options import parse_machine_config


@click.command(
    epilog=example(
        f"memslots run {EXAMPLE_MACHINE[0]}",
        *EXAMPLE_MACHINE[1:-1],
        f"{EXAMPLE_MACHINE[-1]} \\",
        "    -qmp unix:/tmp/qmp.sock,server=on,wait=off --metrics-port 9100",
    )
)
@machine_options
@accel_option
@click.option(
    "-qmp",
    "qmp",
    multiple=True,
    required=True,
    metavar="unix:PATH,server=on,wait=off",
    help="QMP monitor socket (tcp:HOST:PORT only when given explicitly).",
)
@click.option(
    "-guest",
    "guest",
    type=click.Choice(("linux", "none")),
    default="linux",
    show_default=True,
    help="The Linux driver model as guest, or no guest.",
)
@click.option(
    "--metrics-port",
    type=IntRange(min=0, max=65535),
    default=None,
    help="Serve Prometheus metrics on 127.0.0.1:PORT.",
)
@click.option(
    "-incoming",
    "incoming",
    default=None,
    metavar="unix:PATH|tcp:HOST:PORT|file:PATH|defer",
    help="Be a migration destination: listen there (defer: QMP migrate-incoming says where).",
)
@click.option("-S", "freeze", is_flag=True, help="Do not run the guest until QMP 'cont'.")
def run(
    memory: str,
    objects: Sequence[str],
    devices: Sequence[str],
    chardevs: Sequence[str],
    accel: str,
    qmp: Sequence[str],
    guest: str,
    metrics_port: int | None,
    incoming: str | None,
    freeze: bool,
) -> None:
    """Run the machine with a QMP monitor until 'quit', SIGTERM or SIGINT."""
    import asyncio

    from memslots.monitor.runtime import serve
    from memslots.options import parse_migration_uri, parse_qmp_option

    logging.getLogger("memslots").setLevel(logging.INFO)
    config = parse_machine_config(memory, objects, devices, accel=accel, chardevs=chardevs)
    endpoints = [parse_qmp_option(q) for q in qmp]
    uri = None if incoming is None else parse_migration_uri(incoming, incoming=True, defer=True)
    asyncio.run(
        serve(
            config,
            endpoints,
            guest=guest == "linux",
            metrics_port=metrics_port,
            incoming=uri,
            autostart=not freeze,
        )
    )


@click.command(epilog=example("memslots migrate /tmp/src.sock unix:/tmp/mig.sock --wait"))
@click.argument("socket")
@click.argument("uri")
@click.option("--wait", is_flag=True, help="Follow the migration until it ends (progress bar).")
@click.option("--json", "as_json", is_flag=True, help="Print query-migrate's result as JSON.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="With --wait: give up (exit 3) after this many seconds.",
)
def migrate(socket: str, uri: str, wait: bool, as_json: bool, timeout: float) -> None:
    """Migrate the machine at SOCKET to URI (unix:PATH, tcp:HOST:PORT, file:PATH).

    Exits 1 if the migration failed or was cancelled (the reason is printed), 3 on timeout.
    """
    from memslots.monitor.migrate_client import run_migrate

    run_migrate(socket, uri, wait=wait, json_output=as_json, timeout=timeout)


@click.command("qmp", epilog=example("memslots qmp /tmp/qmp.sock qom-get path=vmem0 property=size"))
@click.argument("socket")
@click.argument("command")
@click.argument("args", nargs=-1)
@click.option("--timeout", type=FloatRange(min=0, min_open=True), default=30.0, show_default=True)
def qmp_command(socket: str, command: str, args: Sequence[str], timeout: float) -> None:
    """Send one QMP COMMAND (ARGS as key=value or one JSON object) and print the reply."""
    from memslots.monitor.client import run_qmp

    run_qmp(socket, command, args, timeout=timeout)


@click.command(epilog=example("memslots resize /tmp/qmp.sock vmem0 16G --wait --timeout 60"))
@click.argument("socket")
@click.argument("device")
@click.argument("size")
@click.option("--wait", is_flag=True, help="Wait until the size is reached (progress bar).")
@click.option("--timeout", type=FloatRange(min=0, min_open=True), default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def resize(socket: str, device: str, size: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Set DEVICE's requested-size to SIZE (exit 3 on timeout, 1 on error).

    With --wait, follow the size until the guest gets there, or until it stops short and says
    why (memslots run's guest; exit 1).
    """
    from memslots.monitor.client import run_resize

    run_resize(socket, device, size, wait=wait, timeout=timeout, json_output=as_json)


@click.command(epilog=example("memslots info /tmp/qmp.sock memslots --all"))
@click.argument("socket")
@click.argument("what", type=click.Choice(("memslots", "memory-devices", "budget")))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--all", "show_all", is_flag=True, help="memslots: unmapped ones too.")
@click.option("--wide", is_flag=True, help="Every column, however wide the table gets.")
def info(socket: str, what: str, as_json: bool, show_all: bool, wide: bool) -> None:
    """Show the memslot map (mapped memslots), the memory devices or the memslot budget of a
    running machine."""
    from memslots.monitor.client import run_info

    run_info(socket, what, json_output=as_json, show_all=show_all, wide=wide)
