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
import dataclasses
import json
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
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
from memslots.reports import BudgetReport, Columns, MemslotReport, from_qmp
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


@dataclass(frozen=True)
class ResizeOutcome:
    """Where a resize ended: the ``resize --json`` object (sizes in bytes, time in seconds)."""

    device: str
    requested: int
    start: int
    size: int
    reached: bool
    seconds: float
    #: Why the guest stopped short, in its driver's words (memslots run's guest, asked
    #: through x-query-virtio-mem-guest); None if it got there or the server cannot tell.
    stop_reason: str | None = None


def run_resize(
    address: str,
    device: str,
    size: str | int,
    *,
    wait: bool = False,
    timeout: float = 60.0,
    poll: float = 0.5,
    json_output: bool = False,
    out: Console | None = None,
) -> int:
    """``memslots resize SOCKET DEVICE SIZE [--wait] [--timeout S] [--json]``.

    Sets the virtio-mem device's ``requested-size`` (``DEVICE`` is an id or a QOM path,
    ``SIZE`` a QEMU size). With ``wait``, follows ``MEMORY_DEVICE_SIZE_CHANGE`` events and
    polls ``size`` every ``poll`` seconds until it equals the request (exit 0); until the guest
    stopped short of it for a reason it gives (exit 1, with the reason); the request is changed
    by someone else or the device goes away (exit 1); or ``timeout`` seconds pass (exit 3,
    saying whether the size was still moving). ``json_output`` prints :class:`ResizeOutcome`.
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
                    outcome = ResizeOutcome(device, target, start, start, start == target, 0.0)
                    if json_output:
                        _print_json(out, outcome)
                    else:
                        out.print(
                            f"{device}: requested-size set to {format_size(target)} "
                            f"(plugged {format_size(start)})",
                            highlight=False,
                        )
                    return EXIT_OK
                follow = _Follow(qmp, events, device, path, start, target, poll, out)
                outcome = await follow.run(deadline, progress=not json_output)
        if json_output:
            _print_json(out, outcome)
        elif outcome.reached:
            out.print(
                f"{device}: plugged {format_size(target)} in {outcome.seconds:.1f}s",
                highlight=False,
            )
        if outcome.stop_reason is not None:
            raise MonitorError(
                f"{device}: plugged {format_size(outcome.size)} of {format_size(target)} "
                f"requested; the guest stopped short: {outcome.stop_reason}"
            )
        if not outcome.reached:
            raise MemslotsTimeoutError(follow.timeout_reason(outcome))
        return EXIT_OK

    return _run(main())


def _print_json(out: Console, outcome: ResizeOutcome) -> None:
    text = json.dumps(dataclasses.asdict(outcome), indent=2)
    out.print(text, markup=False, highlight=False, soft_wrap=True)


async def _qom_int(qmp: QMPClient, path: str, prop: str) -> int:
    value = await qmp.execute("qom-get", {"path": path, "property": prop})
    if not isinstance(value, int):
        raise MonitorError(f"qom-get {path} {prop}: expected an integer, got {value!r}")
    return value


class _Follow:
    """``resize --wait``: the size followed until it is reached, the guest gives up, or the
    deadline passes."""

    def __init__(
        self,
        qmp: QMPClient,
        events: EventListener,
        device: str,
        path: str,
        start: int,
        target: int,
        poll: float,
        out: Console,
    ) -> None:
        self.qmp, self.events, self.device, self.path = qmp, events, device, path
        self.start, self.target, self.poll, self.out = start, target, poll, out
        self.loop = asyncio.get_running_loop()
        self.began = self.loop.time()
        self.last_change = self.began
        #: False once the server showed it cannot tell (QEMU has no x-query-virtio-mem-guest).
        self.can_ask_guest = True
        #: The guest's last word on why it is short (backing off, or stopped).
        self.guest_says: str | None = None

    async def run(self, deadline: float, *, progress: bool) -> ResizeOutcome:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TimeElapsedColumn(),
        )
        # A bar is for a person watching: none in a pipe, a log or --json.
        show = progress and self.out.is_terminal
        with Progress(*columns, console=self.out, transient=True, disable=not show) as bar:
            task = bar.add_task(
                f"{self.device} {format_size(self.start)} → {format_size(self.target)}",
                total=max(1, abs(self.target - self.start)),
            )
            last_size = self.start
            while True:
                size = await _qom_int(self.qmp, self.path, "size")
                requested = await _qom_int(self.qmp, self.path, "requested-size")
                now = self.loop.time()
                moved = size != last_size
                if moved:
                    last_size, self.last_change = size, now
                done = min(abs(size - self.start), abs(self.target - self.start))
                bar.update(task, completed=done)
                if requested != self.target:
                    raise MonitorError(
                        f"{self.device}: requested-size was changed to {format_size(requested)} "
                        f"by another client while waiting (plugged {format_size(size)})"
                    )
                if size == self.target:
                    return self._outcome(size, True, None)
                stop_reason = None if moved else await self._guest_gave_up()
                if stop_reason is not None or now >= deadline:
                    return self._outcome(size, False, stop_reason)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.events.get(), min(self.poll, deadline - now))
                self.events.clear()  # each wake-up re-reads the size; older events add nothing

    def _outcome(self, size: int, reached: bool, why: str | None) -> ResizeOutcome:
        seconds = self.loop.time() - self.began
        return ResizeOutcome(self.device, self.target, self.start, size, reached, seconds, why)

    async def _guest_gave_up(self) -> str | None:
        """The guest's reason if it stopped short and waits for a new request; else None."""
        if not self.can_ask_guest:
            return None
        try:
            state = await self.qmp.execute("x-query-virtio-mem-guest", {"id": self.path})
        except ExecuteError:
            self.can_ask_guest = False  # QEMU, or no guest driver: the deadline decides
            return None
        if not isinstance(state, dict):
            return None
        reason = state.get("stop-reason")
        self.guest_says = reason if isinstance(reason, str) else None
        return self.guest_says if state.get("idle") else None

    def timeout_reason(self, outcome: ResizeOutcome) -> str:
        """The timeout message: how far it got and whether the size still moved."""
        since_change = self.loop.time() - self.last_change
        where = f"plugged {format_size(outcome.size)} of {format_size(self.target)} requested"
        if outcome.size == self.start:
            why = "the size never changed (is a guest driver running?)"
        elif since_change >= STALL_SECONDS:
            why = f"the size stopped moving {since_change:.1f}s ago"
        else:
            why = "the size was still moving"
        said = f"; the guest: {self.guest_says}" if self.guest_says else ""
        return f"{self.device}: timed out after {outcome.seconds:.1f}s: {where}; {why}{said}"


# -- memslots info -------------------------------------------------------------------------------


def run_info(
    address: str,
    what: str,
    *,
    json_output: bool = False,
    show_all: bool = False,
    wide: bool = False,
    timeout: float = 30.0,
    out: Console | None = None,
) -> int:
    """``memslots info SOCKET memslots|memory-devices|budget [--json] [--all] [--wide]``: a
    table (or JSON). The memslot table lists mapped memslots, all of them with ``show_all``;
    tables fit 80 columns, ``wide`` adds the rest."""
    out = out if out is not None else Console(width=1000) if wide else Console()

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
            out.print(devices_table(result, wide=wide))
        elif what == "memslots":
            out.print(memslots_table(result, show_all=show_all, wide=wide))
        else:
            for table in budget_tables(result):
                out.print(table)
        return EXIT_OK

    return _run(main())


def devices_table(devices: Any, *, wide: bool = False) -> Table:
    """``info memory-devices``: one row per device, sizes in one unit per column."""
    data = [dev["data"] for dev in devices]

    def sizes(key: str) -> list[int | None]:
        return [d.get(key) if isinstance(d.get(key), int) else None for d in data]

    cols = Columns()
    cols.text("id", [d.get("id", "") for d in data])
    cols.text("type", [dev["type"] for dev in devices])
    cols.text("address", [f"0x{d.get('memaddr', d.get('addr', 0)):x}" for d in data], right=True)
    cols.sizes("size", sizes("size"))
    cols.sizes("requested", sizes("requested-size"))
    cols.sizes("max", sizes("max-size"))
    cols.sizes("block", sizes("block-size"))
    if wide:
        cols.text("node", [str(d.get("node", "")) for d in data], right=True)
        cols.text("memdev", [d.get("memdev", "") for d in data])
    return cols.table("Memory devices")


def memslots_table(memslots: Any, *, show_all: bool = False, wide: bool = False) -> Table:
    """``info memslots``: the mapped memslots of memory devices (all with ``show_all``)."""
    reports = [from_qmp(MemslotReport, item) for item in memslots]
    shown = [m for m in reports if show_all or m.mapped]
    hidden = len(reports) - len(shown)
    cols = Columns()
    cols.text("device", [m.device for m in shown])
    cols.text("index", [str(m.index) for m in shown], right=True)
    cols.text("address", [f"0x{m.address:x}" for m in shown], right=True)
    cols.sizes("size", [m.size for m in shown])
    if show_all:
        cols.text("mapped", ["yes" if m.mapped else "no" for m in shown])
    cols.text(
        "plugged blocks",
        [str(m.plugged_blocks) if m.plugged_blocks is not None else "-" for m in shown],
        right=True,
    )
    cols.text(
        "kvm slot", [str(m.kvm_slot) if m.kvm_slot is not None else "-" for m in shown], right=True
    )
    if wide or any(m.vhost for m in shown):
        cols.text("vhost", [", ".join(m.vhost) or "-" for m in shown])
    return cols.table(
        "Memslots of memory devices" + ("" if show_all else " (mapped)"),
        caption=f"{hidden} unmapped not shown (--all)" if hidden else None,
    )


def budget_tables(data: Any) -> list[Table]:
    """``info budget``: the consumers, then the device-memory accounting."""
    budget: BudgetReport = from_qmp(BudgetReport, data)
    cols = Columns()
    cols.text("consumer", [c.name for c in budget.consumers])
    cols.text("max", [str(c.max_memslots) for c in budget.consumers], right=True)
    cols.text("used", [str(c.used_memslots) for c in budget.consumers], right=True)
    cols.text("free", [str(c.free_memslots) for c in budget.consumers], right=True)
    zap = next((c.slot_zap_all for c in budget.consumers if c.slot_zap_all is not None), None)
    caption = None
    if zap is not None:  # KVM's
        caption = "KVM slot-zap-all: " + (
            "on (a memslot delete zaps all shadow pages)"
            if zap
            else "off (a memslot delete zaps only its own mappings)"
        )
    tables = [cols.table("Memslot budget", caption=caption)]
    dm = budget.device_memory
    if dm is not None:
        cols = Columns()
        cols.text("memslots required", [str(dm.required_memslots)], right=True)
        cols.text("used", [str(dm.used_memslots)], right=True)
        cols.text("reserved", [str(dm.reserved_memslots)], right=True)
        cols.text("auto decision", ["yes" if dm.auto_decision_active else "no"])
        cols.sizes("space used", [dm.used_space])
        cols.sizes("space in all", [dm.total_space])
        tables.append(cols.table("Device memory"))
    return tables
