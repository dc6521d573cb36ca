"""The client side of the monitor: ``memslots qmp``, ``resize`` and ``info`` over QMP.

Everything goes through ``qemu.qmp``'s :class:`~qemu.qmp.QMPClient`, so these commands work
against QEMU as well as against ``memslots run``. Each entry point is a plain function that
returns :data:`~memslots.errors.EXIT_OK` or raises: :class:`~memslots.errors.MonitorError` when
the server refused or the connection failed or was lost, and
:class:`~memslots.errors.MemslotsTimeoutError` when something did not happen in time. The
command line's one handler turns them into a message and an exit status.

An address is a Unix socket path, ``unix:PATH``, or ``HOST:PORT`` / ``tcp:HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    StateError,
)
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from memslots.errors import EXIT_OK, MemslotsTimeoutError, MonitorError, OptionError
from memslots.options import parse_address, parse_arguments, parse_size
from memslots.reports import BudgetReport, MemslotReport, from_qmp
from memslots.sizes import format_size

PERIPHERAL = "/machine/peripheral/"
INFO_COMMANDS = {
    "memory-devices": "query-memory-devices",
    "memslots": "x-query-memslots",
    "budget": "x-query-memslot-budget",
}
#: Without a size change for this long, a resize that times out is reported as stalled.
STALL_SECONDS = 2.0


def _console(out: Console | None) -> Console:
    return out if out is not None else Console()


@contextlib.asynccontextmanager
async def _session(address: str, name: str, timeout: float) -> AsyncIterator[QMPClient]:
    qmp = QMPClient(name)
    try:
        await asyncio.wait_for(qmp.connect(parse_address(address)), timeout)
    except TimeoutError:
        raise MemslotsTimeoutError(f"{address}: no QMP greeting within {timeout:g}s") from None
    except ConnectError as exc:
        raise MonitorError(f"cannot connect to {address}: {exc}") from None
    try:
        yield qmp
    except ExecuteError as exc:
        raise MonitorError(f"{exc.sent['execute']}: {exc.error_class}: {exc}") from None
    except (ExecInterruptedError, StateError, EOFError, ConnectionError) as exc:
        # StateError: the client noticed the hang-up first and refuses to send.
        raise MonitorError(f"connection to {address} lost: the server hung up") from exc
    finally:
        # The outcome is decided; a disconnect error (the server already hung up) adds nothing.
        with contextlib.suppress(Exception):
            await qmp.disconnect()


def _run(coro: Coroutine[Any, Any, int]) -> int:
    code: int = asyncio.run(coro)
    return code


# -- memslots qmp --------------------------------------------------------------------------------


def run_qmp(
    address: str,
    command: str,
    args: Sequence[str] = (),
    *,
    timeout: float = 30.0,
    out: Console | None = None,
) -> int:
    """``memslots qmp SOCKET COMMAND [ARGS]``: execute one command, print its JSON result."""
    out = _console(out)

    async def main() -> int:
        arguments = parse_arguments(args)
        async with _session(address, "memslots-qmp", timeout) as qmp:
            try:
                result = await asyncio.wait_for(qmp.execute(command, arguments or None), timeout)
            except TimeoutError:
                raise MemslotsTimeoutError(f"{command}: no answer within {timeout:g}s") from None
        out.print(json.dumps(result, indent=2), markup=False, highlight=False, soft_wrap=True)
        return EXIT_OK

    return _run(main())


# -- memslots resize -----------------------------------------------------------------------------


def run_resize(
    address: str,
    device: str,
    size: str | int,
    *,
    wait: bool = False,
    timeout: float = 60.0,
    poll: float = 0.5,
    out: Console | None = None,
) -> int:
    """``memslots resize SOCKET DEVICE SIZE [--wait] [--timeout S]``.

    Sets the virtio-mem device's ``requested-size`` (``DEVICE`` is an id or a QOM path,
    ``SIZE`` a QEMU size). With ``wait``, follows ``MEMORY_DEVICE_SIZE_CHANGE`` events and
    polls ``size`` every ``poll`` seconds until it equals the request (exit 0), the request is
    changed by someone else or the device goes away (exit 1), or ``timeout`` seconds pass
    (exit 2, saying whether the size was still moving).
    """
    out = _console(out)

    async def main() -> int:
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            # _follow keeps the deadline itself; this only ends a wait on a server that hangs.
            async with asyncio.timeout_at(deadline + poll + 1.0):
                return await resize(deadline)
        except TimeoutError:
            raise MemslotsTimeoutError(f"{device}: the server stopped answering") from None

    async def resize(deadline: float) -> int:
        target = size if isinstance(size, int) else parse_size(size, what="SIZE")
        path = device if device.startswith("/") else PERIPHERAL + device
        async with _session(address, "memslots-resize", timeout) as qmp:

            def same_device(msg: Any) -> bool:
                return bool(msg.get("data", {}).get("qom-path") == path)

            with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE", same_device) as events:
                start = await _qom_int(qmp, path, "size")
                await qmp.execute(
                    "qom-set", {"path": path, "property": "requested-size", "value": target}
                )
                if not wait:
                    out.print(
                        f"{device}: requested-size set to {format_size(target)} "
                        f"(plugged {format_size(start)})",
                        highlight=False,
                    )
                    return EXIT_OK
                return await _follow(qmp, events, device, path, start, target, deadline, poll, out)

    return _run(main())


async def _qom_int(qmp: QMPClient, path: str, prop: str) -> int:
    value = await qmp.execute("qom-get", {"path": path, "property": prop})
    if not isinstance(value, int):
        raise MonitorError(f"qom-get {path} {prop}: expected an integer, got {value!r}")
    return value


async def _follow(
    qmp: QMPClient,
    events: EventListener,
    device: str,
    path: str,
    start: int,
    target: int,
    deadline: float,
    poll: float,
    out: Console,
) -> int:
    loop = asyncio.get_running_loop()
    began = loop.time()
    last_size, last_change = start, began
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=out, transient=True) as progress:
        task = progress.add_task(
            f"{device} {format_size(start)} → {format_size(target)}",
            total=max(1, abs(target - start)),
        )
        while True:
            size = await _qom_int(qmp, path, "size")
            requested = await _qom_int(qmp, path, "requested-size")
            now = loop.time()
            if size != last_size:
                last_size, last_change = size, now
            progress.update(task, completed=min(abs(size - start), abs(target - start)))
            if requested != target:
                raise MonitorError(
                    f"{device}: requested-size was changed to {format_size(requested)} by another "
                    f"client while waiting (plugged {format_size(size)})"
                )
            if size == target:
                break
            if now >= deadline:
                raise MemslotsTimeoutError(
                    _timeout_reason(device, start, size, target, now - began, now - last_change)
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(events.get(), min(poll, deadline - now))
            events.clear()  # each wake-up re-reads the size; older events add nothing
    out.print(
        f"{device}: plugged {format_size(target)} in {loop.time() - began:.1f}s",
        highlight=False,
    )
    return EXIT_OK


def _timeout_reason(
    device: str, start: int, size: int, target: int, waited: float, since_change: float
) -> str:
    where = f"plugged {format_size(size)} of {format_size(target)} requested"
    if size == start:
        why = "the size never changed (is a guest driver running?)"
    elif since_change >= STALL_SECONDS:
        why = f"the size stopped moving {since_change:.1f}s ago"
    else:
        why = "the size was still moving"
    return f"{device}: timed out after {waited:.1f}s: {where}; {why}"


# -- memslots info -------------------------------------------------------------------------------


def run_info(
    address: str,
    what: str,
    *,
    json_output: bool = False,
    timeout: float = 30.0,
    out: Console | None = None,
) -> int:
    """``memslots info SOCKET memslots|memory-devices|budget [--json]``: a table (or JSON)."""
    out = _console(out)

    async def main() -> int:
        command = INFO_COMMANDS.get(what)
        if command is None:
            raise OptionError(f"info {what}: expects one of {', '.join(INFO_COMMANDS)}")
        async with _session(address, "memslots-info", timeout) as qmp:
            try:
                result = await asyncio.wait_for(qmp.execute(command), timeout)
            except TimeoutError:
                raise MemslotsTimeoutError(f"{command}: no answer within {timeout:g}s") from None
        if json_output:
            out.print(json.dumps(result, indent=2), markup=False, highlight=False, soft_wrap=True)
        elif what == "memory-devices":
            out.print(_devices_table(result))
        elif what == "memslots":
            out.print(_memslots_table(result))
        else:
            for table in _budget_tables(result):
                out.print(table)
        return EXIT_OK

    return _run(main())


def _size(value: Any) -> str:
    return format_size(value) if isinstance(value, int) else "-"


def _devices_table(devices: Any) -> Table:
    table = Table(title="Memory devices")
    for name in ("type", "id", "address", "size", "requested", "max size", "block", "node"):
        table.add_column(name, justify="right" if name not in ("type", "id") else "left")
    table.add_column("memdev")
    for dev in devices:
        d = dev["data"]
        addr = d.get("memaddr", d.get("addr", 0))
        table.add_row(
            dev["type"],
            d.get("id", ""),
            f"0x{addr:x}",
            _size(d.get("size")),
            _size(d.get("requested-size")),
            _size(d.get("max-size")),
            _size(d.get("block-size")),
            str(d.get("node", "")),
            d.get("memdev", ""),
        )
    return table


def _memslots_table(memslots: Any) -> Table:
    table = Table(title="Memslots of memory devices")
    for name in ("device", "index", "address", "size", "mapped", "plugged blocks", "kvm slot"):
        table.add_column(name, justify="left" if name == "device" else "right")
    table.add_column("vhost")
    for m in (from_qmp(MemslotReport, item) for item in memslots):
        table.add_row(
            m.device,
            str(m.index),
            f"0x{m.address:x}",
            format_size(m.size),
            "yes" if m.mapped else "no",
            str(m.plugged_blocks) if m.plugged_blocks is not None else "-",
            str(m.kvm_slot) if m.kvm_slot is not None else "-",
            ", ".join(m.vhost) or "-",
        )
    return table


def _budget_tables(data: Any) -> list[Table]:
    budget: BudgetReport = from_qmp(BudgetReport, data)
    consumers = Table(title="Memslot budget")
    consumers.add_column("consumer")
    for name in ("max", "used", "free"):
        consumers.add_column(name, justify="right")
    for c in budget.consumers:
        consumers.add_row(c.name, str(c.max_memslots), str(c.used_memslots), str(c.free_memslots))
        if c.slot_zap_all is not None:  # KVM's
            consumers.caption = "KVM slot-zap-all: " + (
                "on (a memslot delete zaps all shadow pages)"
                if c.slot_zap_all
                else "off (a memslot delete zaps only its own mappings)"
            )
    tables = [consumers]
    dm = budget.device_memory
    if dm is not None:
        devmem = Table(title="Device memory")
        devmem.add_column("memslots required", justify="right")
        devmem.add_column("used", justify="right")
        devmem.add_column("reserved", justify="right")
        devmem.add_column("auto decision")
        devmem.add_column("space used", justify="right")
        devmem.add_row(
            str(dm.required_memslots),
            str(dm.used_memslots),
            str(dm.reserved_memslots),
            "yes" if dm.auto_decision_active else "no",
            f"{format_size(dm.used_space)} of {format_size(dm.total_space)}",
        )
        tables.append(devmem)
    return tables
