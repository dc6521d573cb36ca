"""The client side of the monitor: ``memslots qmp``, ``resize`` and ``info`` over QMP.

Everything goes through ``qemu.qmp``'s :class:`~qemu.qmp.QMPClient`, so these commands work
against QEMU as well as against ``memslots run``. Each entry point is a plain function that
returns the process exit status: :data:`EXIT_OK`, :data:`EXIT_ERROR` (the server refused, the
connection failed or was lost) or :data:`EXIT_TIMEOUT`.

An address is a Unix socket path, ``unix:PATH``, or ``HOST:PORT`` / ``tcp:HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
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

from memslots.errors import MemslotsError, OptionError
from memslots.sizes import format_size, parse_size

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_TIMEOUT = 2

PERIPHERAL = "/machine/peripheral/"
INFO_COMMANDS = {
    "memory-devices": "query-memory-devices",
    "memslots": "x-query-memslots",
    "budget": "x-query-memslot-budget",
}
#: Without a size change for this long, a resize that times out is reported as stalled.
STALL_SECONDS = 2.0

Address = str | tuple[str, int]
_TCP = re.compile(r"^(?:tcp:)?(?P<host>\[[^\]]+\]|[^/:\[\]]+):(?P<port>\d+)$")


class _Failed(Exception):
    """Ends a command with an exit status and a message for stderr."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def parse_address(text: str) -> Address:
    """A QMP address: ``HOST:PORT`` or ``tcp:HOST:PORT`` is TCP, anything else a socket path."""
    if text.startswith("unix:"):
        return text.removeprefix("unix:")
    match = _TCP.match(text)
    if match is None:
        return text
    return match["host"].strip("[]"), int(match["port"])


def parse_arguments(items: Sequence[str]) -> dict[str, object]:
    """Command arguments from ``key=value`` words (values are JSON if they parse, else strings)
    or from one JSON object.
    """
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            obj: dict[str, object] = json.loads(items[0])  # starts with "{": an object or invalid
        except ValueError as exc:
            raise OptionError(f"arguments '{items[0]}': not valid JSON: {exc}") from None
        return obj
    args: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise OptionError(f"argument '{item}' is not of the form key=value")
        if key in args:
            raise OptionError(f"argument '{key}' given twice")
        try:
            args[key] = json.loads(raw, parse_constant=_not_json)
        except ValueError:
            args[key] = raw
    return args


def _not_json(name: str) -> object:
    raise ValueError(name)


def _consoles(out: Console | None, err: Console | None) -> tuple[Console, Console]:
    return out if out is not None else Console(), err if err is not None else Console(stderr=True)


def _report(err: Console, message: str) -> None:
    err.print(f"memslots: {message}", markup=False, highlight=False, soft_wrap=True)


@contextlib.asynccontextmanager
async def _session(address: str, name: str, timeout: float) -> AsyncIterator[QMPClient]:
    qmp = QMPClient(name)
    try:
        await asyncio.wait_for(qmp.connect(parse_address(address)), timeout)
    except TimeoutError:
        raise _Failed(f"{address}: no QMP greeting within {timeout:g}s", EXIT_TIMEOUT) from None
    except ConnectError as exc:
        raise _Failed(f"cannot connect to {address}: {exc}") from None
    try:
        yield qmp
    except ExecuteError as exc:
        raise _Failed(f"{exc.sent['execute']}: {exc.error_class}: {exc}") from None
    except (ExecInterruptedError, StateError, EOFError, ConnectionError) as exc:
        # StateError: the client noticed the hang-up first and refuses to send.
        raise _Failed(f"connection to {address} lost: the server hung up") from exc
    finally:
        # The outcome is decided; a disconnect error (the server already hung up) adds nothing.
        with contextlib.suppress(Exception):
            await qmp.disconnect()


def _run(coro: Coroutine[Any, Any, int], err: Console) -> int:
    try:
        code: int = asyncio.run(coro)
    except _Failed as exc:
        _report(err, str(exc))
        return exc.code
    except MemslotsError as exc:
        _report(err, str(exc))
        return EXIT_ERROR
    return code


# -- memslots qmp --------------------------------------------------------------------------------


def run_qmp(
    address: str,
    command: str,
    args: Sequence[str] = (),
    *,
    timeout: float = 30.0,
    out: Console | None = None,
    err: Console | None = None,
) -> int:
    """``memslots qmp SOCKET COMMAND [ARGS]``: execute one command, print its JSON result."""
    out, err = _consoles(out, err)

    async def main() -> int:
        arguments = parse_arguments(args)
        async with _session(address, "memslots-qmp", timeout) as qmp:
            try:
                result = await asyncio.wait_for(qmp.execute(command, arguments or None), timeout)
            except TimeoutError:
                raise _Failed(f"{command}: no answer within {timeout:g}s", EXIT_TIMEOUT) from None
        out.print(json.dumps(result, indent=2), markup=False, highlight=False, soft_wrap=True)
        return EXIT_OK

    return _run(main(), err)


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
    err: Console | None = None,
) -> int:
    """``memslots resize SOCKET DEVICE SIZE [--wait] [--timeout S]``.

    Sets the virtio-mem device's ``requested-size`` (``DEVICE`` is an id or a QOM path,
    ``SIZE`` a QEMU size). With ``wait``, follows ``MEMORY_DEVICE_SIZE_CHANGE`` events and
    polls ``size`` every ``poll`` seconds until it equals the request (exit 0), the request is
    changed by someone else or the device goes away (exit 1), or ``timeout`` seconds pass
    (exit 2, saying whether the size was still moving).
    """
    out, err = _consoles(out, err)

    async def main() -> int:
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            # _follow keeps the deadline itself; this only ends a wait on a server that hangs.
            async with asyncio.timeout_at(deadline + poll + 1.0):
                return await resize(deadline)
        except TimeoutError:
            raise _Failed(f"{device}: the server stopped answering", EXIT_TIMEOUT) from None

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

    return _run(main(), err)


async def _qom_int(qmp: QMPClient, path: str, prop: str) -> int:
    value = await qmp.execute("qom-get", {"path": path, "property": prop})
    if not isinstance(value, int):
        raise _Failed(f"qom-get {path} {prop}: expected an integer, got {value!r}")
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
                raise _Failed(
                    f"{device}: requested-size was changed to {format_size(requested)} by another "
                    f"client while waiting (plugged {format_size(size)})"
                )
            if size == target:
                break
            if now >= deadline:
                raise _Failed(
                    _timeout_reason(device, start, size, target, now - began, now - last_change),
                    EXIT_TIMEOUT,
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
    err: Console | None = None,
) -> int:
    """``memslots info SOCKET memslots|memory-devices|budget [--json]``: a table (or JSON)."""
    out, err = _consoles(out, err)

    async def main() -> int:
        command = INFO_COMMANDS.get(what)
        if command is None:
            raise OptionError(f"info {what}: expects one of {', '.join(INFO_COMMANDS)}")
        async with _session(address, "memslots-info", timeout) as qmp:
            try:
                result = await asyncio.wait_for(qmp.execute(command), timeout)
            except TimeoutError:
                raise _Failed(f"{command}: no answer within {timeout:g}s", EXIT_TIMEOUT) from None
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

    return _run(main(), err)


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
    for m in memslots:
        table.add_row(
            m["device"],
            str(m["index"]),
            f"0x{m['addr']:x}",
            format_size(m["size"]),
            "yes" if m["mapped"] else "no",
            str(m.get("plugged-blocks", "-")),
            str(m.get("kvm-slot", "-")),
            ", ".join(m.get("vhost", [])) or "-",
        )
    return table


def _budget_tables(budget: Any) -> list[Table]:
    consumers = Table(title="Memslot budget")
    consumers.add_column("consumer")
    for name in ("max", "used", "free"):
        consumers.add_column(name, justify="right")
    for c in budget["consumers"]:
        consumers.add_row(c["name"], str(c["max"]), str(c["used"]), str(c["free"]))
    if "slot-zap-all" in budget:
        consumers.caption = "KVM slot-zap-all: " + (
            "on (a memslot delete zaps all shadow pages)"
            if budget["slot-zap-all"]
            else "off (a memslot delete zaps only its own mappings)"
        )
    tables = [consumers]
    dm = budget.get("device-memory")
    if dm is not None:
        devmem = Table(title="Device memory")
        devmem.add_column("memslots required", justify="right")
        devmem.add_column("used", justify="right")
        devmem.add_column("reserved", justify="right")
        devmem.add_column("auto decision")
        devmem.add_column("space used", justify="right")
        devmem.add_row(
            str(dm["required"]),
            str(dm["used"]),
            str(dm["reserved"]),
            "yes" if dm["auto-decision"] else "no",
            f"{format_size(dm['used-space'])} of {format_size(dm['total-space'])}",
        )
        tables.append(devmem)
    return tables
