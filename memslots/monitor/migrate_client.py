"""``memslots migrate SOCKET URI [--wait] [--json]``: start a migration over QMP and follow it.

It speaks QEMU's commands only (``migrate``, ``query-migrate``), so it drives QEMU as well as
``memslots run``. With ``--wait`` it polls ``query-migrate`` and shows a progress bar (bytes
sent of those known to go, the pass, the time left at the current rate) until the migration
completed (exit 0), failed or was cancelled (exit 1, with QEMU's ``error-desc``), or the
timeout passed (exit 3; the migration goes on).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from qemu.qmp import QMPClient
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from memslots.errors import EXIT_OK, MemslotsTimeoutError, MonitorError

# One session helper for every client command: connection errors and refusals become
# MonitorError, a server that does not greet a timeout.
from memslots.monitor.client import _session
from memslots.sizes import format_size

#: query-migrate statuses after which nothing changes any more.
FINAL = ("completed", "failed", "cancelled")


def run_migrate(
    address: str,
    uri: str,
    *,
    wait: bool = False,
    json_output: bool = False,
    timeout: float = 600.0,
    poll: float = 0.25,
    out: Console | None = None,
) -> int:
    """Start the migration; with ``wait``, follow it to its end (see the module docstring)."""
    console = out if out is not None else Console()

    async def main() -> int:
        async with _session(address, "memslots-migrate", min(timeout, 30.0)) as qmp:
            await qmp.execute("migrate", {"uri": uri})
            info = await _query(qmp)
            if wait:
                info = await _follow(qmp, info, timeout, poll, console, quiet=json_output)
        if json_output:
            console.print(json.dumps(info, indent=2), markup=False, highlight=False)
        else:
            console.print(_summary(uri, info), highlight=False)
        status = info.get("status")
        if status == "failed":
            raise MonitorError(f"migration to {uri} failed: {info.get('error-desc', '?')}")
        if status == "cancelled":
            raise MonitorError(f"migration to {uri} was cancelled")
        return EXIT_OK

    code: int = asyncio.run(main())
    return code


async def _query(qmp: QMPClient) -> dict[str, Any]:
    info = await qmp.execute("query-migrate")
    if not isinstance(info, dict):
        raise MonitorError(f"query-migrate: expected an object, got {info!r}")
    return info


async def _follow(
    qmp: QMPClient,
    info: dict[str, Any],
    timeout: float,
    poll: float,
    console: Console,
    *,
    quiet: bool,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("pass {task.fields[passes]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=quiet) as progress:
        task = progress.add_task("migrating", total=None, passes=0)
        while info.get("status") not in FINAL:
            ram = info.get("ram", {})
            sent = ram.get("transferred", 0)
            progress.update(
                task,
                description=info.get("status", "?"),
                completed=sent,
                total=sent + ram.get("remaining", 0) or None,
                passes=ram.get("dirty-sync-count", 0),
            )
            if loop.time() >= deadline:
                raise MemslotsTimeoutError(
                    f"the migration is still {info.get('status')} after {timeout:g}s "
                    f"({format_size(sent)} sent; it goes on: migrate_cancel stops it)"
                )
            await asyncio.sleep(poll)
            info = await _query(qmp)
    return info


def _summary(uri: str, info: dict[str, Any]) -> str:
    status = info.get("status", "none")
    ram = info.get("ram")
    if status != "completed" or not isinstance(ram, dict):
        return f"migration to {uri}: {status}"
    return (
        f"migrated to {uri}: {format_size(ram.get('transferred', 0))} sent "
        f"({ram.get('normal', 0)} pages of data, {ram.get('duplicate', 0)} zero pages) in "
        f"{ram.get('dirty-sync-count', 0)} passes, {info.get('total-time', 0)} ms, "
        f"downtime {info.get('downtime', 0)} ms"
    )
