"""Migration over QMP, with QEMU 8.2's commands, fields, events and texts.

Commands: ``migrate`` (``uri``), ``migrate_cancel``, ``query-migrate``,
``migrate-set-parameters``/``query-migrate-parameters`` (``downtime-limit``, ``max-bandwidth``),
``migrate-set-capabilities``/``query-migrate-capabilities`` (``events``, ``x-ignore-shared``),
``migrate-incoming`` (after ``-incoming defer``); and our extension ``x-query-ram-digest`` (XXH3-64
of the memory a migration carries, to compare a source with its destination). Events: ``MIGRATION``
and ``MIGRATION_PASS`` (only with the ``events`` capability, as in QEMU), ``STOP`` and ``RESUME``
(the runtime's).

Run states (``query-status``) are the runtime's single notion (:class:`RunControl`); a
migration moves them as QEMU does: a source goes ``running`` -> ``finish-migrate`` (STOP) ->
``postmigrate``, or back to ``running`` (RESUME) when the migration fails or is cancelled; a
destination is ``inmigrate`` until it loaded the stream, then ``running`` (RESUME) or
``paused`` (``-S``). A destination whose load fails ends the process (non-zero exit).

The jobs themselves are :mod:`memslots.migration.outgoing` and
:mod:`memslots.migration.incoming`; here they are started, queried and told apart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from memslots.errors import MemslotsError, MigrationError
from memslots.machine.machine import Machine
from memslots.machine.vm import GuestVm
from memslots.migration.incoming import Incoming
from memslots.migration.machine import LoadedMachine, ram_digest
from memslots.migration.outgoing import Outgoing
from memslots.migration.status import (
    MAX_DOWNTIME_LIMIT_MS,
    MigrationCapabilities,
    MigrationParameters,
    MigrationStatus,
)
from memslots.monitor.qmp_server import Command, Param, QMPCommandError, QMPServer
from memslots.monitor.runstate import (
    FINISH_MIGRATE,
    INMIGRATE,
    PAUSED,
    POSTMIGRATE,
    RUNNING,
)
from memslots.options import MigrationUri, parse_migration_uri

log = logging.getLogger("memslots.monitor.migration")

T = TypeVar("T")


class RunControl(Protocol):
    """What migration needs from the runtime: the machine, its guest and its run state."""

    @property
    def machine(self) -> Machine:
        """The machine."""
        ...

    @property
    def guest(self) -> GuestVm | None:
        """The guest VM (None without a guest, and on a destination before its load)."""
        ...

    def status(self) -> str:
        """QEMU's RunState."""
        ...

    def set_status(self, state: str) -> None:
        """Enter ``state`` without stopping or starting the guest."""
        ...

    def stop(self, state: str = PAUSED) -> bool:
        """Stop the guest (STOP) and enter ``state``; False if it was not running."""
        ...

    def cont(self) -> None:
        """Run the guest (RESUME)."""
        ...

    @property
    def autostart(self) -> bool:
        """Whether a destination runs once loaded (not with ``-S``, nor after ``stop``)."""
        ...

    @autostart.setter
    def autostart(self, value: bool) -> None: ...

    def resume_incoming(self, loaded: LoadedMachine) -> None:
        """Take the loaded machine over: resume the guest from the STATE sections (raises
        :class:`MigrationError` if they do not fit)."""
        ...

    def incoming_failed(self, error: MigrationError) -> None:
        """The destination's load failed: the process must end with ``error``."""
        ...

    async def locked(self, fn: Callable[[], T], /) -> T:
        """``fn()`` with the machine to itself (between guest requests, commands, scrapes)."""
        ...

    async def quiesce(self) -> None:
        """Wait until nothing of the (stopped) guest runs any more."""
        ...


class _Source:
    """The running machine as a migration source (``outgoing.SourceVm``)."""

    def __init__(self, monitor: MigrationMonitor) -> None:
        self.monitor = monitor
        self.run = monitor.runtime
        self._old_state = self.run.status()

    def vcpus_running(self) -> bool:
        return self.run.status() == RUNNING

    def stop_vcpus(self) -> None:
        self._old_state = self.run.status()
        self.run.stop(FINISH_MIGRATE)

    def resume_vcpus(self) -> None:
        self.run.cont()

    def migrated(self) -> None:
        self.run.set_status(POSTMIGRATE)

    def guest_state(self) -> tuple[dict[str, tuple[int, bytes]], dict[str, bytes]]:
        guest = self.run.guest
        if self.run.status() != FINISH_MIGRATE:
            # A source that was already stopped goes through finish-migrate too (QEMU).
            self._old_state = self.run.status()
            self.run.set_status(FINISH_MIGRATE)
        return guest.save_state() if guest is not None else ({}, {})

    def dirty_gpa_ranges(self) -> list[tuple[int, int]]:
        guest = self.run.guest
        return guest.dirty_ranges() if guest is not None else []

    def status_changed(self, status: MigrationStatus) -> None:
        self.monitor.migration_event(status)
        failed = status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED)
        if failed and self.run.status() == FINISH_MIGRATE and self._old_state != RUNNING:
            # A stopped source stays stopped; a running one is resumed by resume_vcpus().
            self.run.set_status(self._old_state)

    def pass_done(self, count: int) -> None:
        if self.monitor.caps.events:
            self.monitor.server.emit_event("MIGRATION_PASS", {"pass": count})

    async def locked(self, fn: Callable[[], T]) -> T:
        return await self.run.locked(fn)

    async def quiesce(self) -> None:
        await self.run.quiesce()


class MigrationMonitor:
    """The migration commands of one running machine, registered in ``server``."""

    def __init__(self, runtime: RunControl, server: QMPServer) -> None:
        self.runtime = runtime
        self.server = server
        self.params = MigrationParameters()
        self.caps = MigrationCapabilities()
        self.outgoing: Outgoing | None = None
        self.incoming: Incoming | None = None
        self._incoming_started = False
        self._tasks: set[asyncio.Task[None]] = set()
        for command in self._commands():
            server.register(command)

    @property
    def migrating(self) -> bool:
        """True while an outgoing migration runs (QEMU's migration_is_running())."""
        return self.outgoing is not None and self.outgoing.status.running

    def _commands(self) -> list[Command]:
        return [
            Command(
                "migrate",
                self._migrate,
                (
                    Param("uri", "str"),
                    Param("detach", "bool", True),
                    Param("resume", "bool", True),
                ),
            ),
            Command("migrate_cancel", self._migrate_cancel),
            Command("query-migrate", self._query_migrate),
            Command(
                "migrate-set-parameters",
                self._set_parameters,
                (Param("downtime-limit", "uint64", True), Param("max-bandwidth", "size", True)),
            ),
            Command("query-migrate-parameters", self._query_parameters),
            Command(
                "migrate-set-capabilities",
                self._set_capabilities,
                (Param("capabilities", "array", items="object"),),
            ),
            Command("query-migrate-capabilities", self._query_capabilities),
            Command("migrate-incoming", self._migrate_incoming, (Param("uri", "str"),)),
            Command("x-query-ram-digest", self._ram_digest),
        ]

    # -- events --------------------------------------------------------------------------------

    def migration_event(self, status: MigrationStatus) -> None:
        """QEMU's MIGRATION event, sent only with the ``events`` capability."""
        if self.caps.events:
            self.server.emit_event("MIGRATION", {"status": status.value})

    # -- outgoing ------------------------------------------------------------------------------

    def _migrate(self, args: dict[str, Any]) -> object:
        if args.get("resume"):
            raise QMPCommandError("Cannot resume if there is no paused migration")
        if self.migrating:
            raise QMPCommandError("There's a migration process in progress")
        state = self.runtime.status()
        if state == INMIGRATE:
            raise QMPCommandError("Guest is waiting for an incoming migration")
        if state == POSTMIGRATE:
            raise QMPCommandError("Can't migrate the vm that was paused due to previous migration")
        uri = parse_migration_uri(args["uri"])
        job = Outgoing(self.runtime.machine, uri, self.params, self.caps, _Source(self))
        self.outgoing = job
        self._start(job.run(), f"migration to {uri}")
        return {}

    def _migrate_cancel(self, args: dict[str, Any]) -> object:
        if self.outgoing is not None:
            self.outgoing.cancel()
        return {}

    def _query_migrate(self, args: dict[str, Any]) -> object:
        if self.outgoing is not None:
            return self.outgoing.info()
        if self.incoming is not None:
            return self.incoming.info()
        return {}

    def _set_parameters(self, args: dict[str, Any]) -> object:
        downtime = args.get("downtime-limit")
        if downtime is not None and downtime > MAX_DOWNTIME_LIMIT_MS:
            raise QMPCommandError(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to "
                f"{MAX_DOWNTIME_LIMIT_MS} milliseconds"
            )
        if downtime is not None:
            self.params.downtime_limit = downtime
        if "max-bandwidth" in args:
            self.params.max_bandwidth = args["max-bandwidth"]
        return {}

    def _query_parameters(self, args: dict[str, Any]) -> object:
        return {
            "downtime-limit": self.params.downtime_limit,
            "max-bandwidth": self.params.max_bandwidth,
        }

    def _set_capabilities(self, args: dict[str, Any]) -> object:
        changes: dict[str, bool] = {}
        for i, item in enumerate(args["capabilities"]):
            where = f"capabilities[{i}]"
            for key in item:
                if key not in ("capability", "state"):
                    raise QMPCommandError(f"Parameter '{where}.{key}' is unexpected")
            name, state = item.get("capability"), item.get("state")
            if name is None:
                raise QMPCommandError(f"Parameter '{where}.capability' is missing")
            if state is None:
                raise QMPCommandError(f"Parameter '{where}.state' is missing")
            if not isinstance(name, str):
                raise QMPCommandError(
                    f"Invalid parameter type for '{where}.capability', expected: string"
                )
            if not isinstance(state, bool):
                raise QMPCommandError(
                    f"Invalid parameter type for '{where}.state', expected: boolean"
                )
            if name not in MigrationCapabilities.NAMES:
                raise QMPCommandError(
                    f"Parameter '{where}.capability' does not accept value '{name}'"
                )
            changes[MigrationCapabilities.NAMES[name]] = state
        if self.migrating:
            raise QMPCommandError("There's a migration process in progress")
        for attr, state in changes.items():
            setattr(self.caps, attr, state)
        return {}

    def _query_capabilities(self, args: dict[str, Any]) -> object:
        return [
            {"capability": name, "state": getattr(self.caps, attr)}
            for name, attr in MigrationCapabilities.NAMES.items()
        ]

    # -- incoming ------------------------------------------------------------------------------

    def start_incoming(self, uri: MigrationUri) -> Incoming:
        """Listen for the source (``-incoming URI`` or ``migrate-incoming``); the load runs
        as a task of the loop. Raises :class:`MigrationError` if it cannot listen."""
        incoming = Incoming(
            self.runtime.machine, uri, self.migration_event, locked=self.runtime.locked
        )
        self.incoming = incoming
        self._incoming_started = True
        self._start(self._load(incoming), f"incoming migration on {uri}")
        return incoming

    def _migrate_incoming(self, args: dict[str, Any]) -> object:
        if self._incoming_started:
            raise QMPCommandError("The incoming migration has already been started")
        if self.runtime.status() != INMIGRATE:
            raise QMPCommandError("'-incoming' was not specified on the command line")
        self.start_incoming(parse_migration_uri(args["uri"], incoming=True))
        return {}

    async def _load(self, incoming: Incoming) -> None:
        try:
            loaded = await incoming.run()
        except MigrationError as exc:
            log.error("load of migration failed: %s", exc)
            self.runtime.incoming_failed(exc)
            return
        try:
            await self.runtime.locked(functools.partial(self.runtime.resume_incoming, loaded))
        except MemslotsError as exc:
            incoming.fail(str(exc))
            self.runtime.incoming_failed(MigrationError(str(exc)))
            return
        if self.runtime.autostart:
            self.runtime.cont()
        else:
            self.runtime.set_status(PAUSED)
        incoming.complete()

    async def _ram_digest(self, args: dict[str, Any]) -> object:
        return await asyncio.to_thread(ram_digest, self.runtime.machine)

    # -- tasks ---------------------------------------------------------------------------------

    def _start(self, coro: Any, what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """End a migration that still runs (the process is quitting) and wait for it."""
        if self.incoming is not None:
            await self.incoming.aclose()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
