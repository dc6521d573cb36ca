"""The destination side of a migration: listen (``-incoming``, ``migrate-incoming``), load,
answer.

:class:`Incoming` runs as a task on the event loop that runs the machine. Reading the stream
-- RAM straight into guest memory, checked record by record -- goes to a worker thread
(:meth:`~memslots.migration.machine.MachineLoader.next_record`); every section is applied on
the loop (:meth:`~memslots.migration.machine.MachineLoader.apply`), where the machine's other
changes run, so the monitor answers while RAM arrives. After END the runtime resumes the
guest from the STATE sections and calls :meth:`Incoming.complete`, which tells the source
(over a socket) whether the destination now runs. A load that fails is cancelled (no memslot
stays mapped, memory is given back) and raises :class:`~memslots.errors.MigrationError`; the
destination must then not run.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from memslots.closing import Closing
from memslots.errors import MemslotsError, MigrationError
from memslots.machine.machine import Machine
from memslots.migration.channel import Endpoint, Listener
from memslots.migration.machine import LoadedMachine, MachineLoader
from memslots.migration.status import MigrationStatus
from memslots.migration.stream import EndRecord, SectionRecord, StreamReader
from memslots.options import MigrationUri

T = TypeVar("T")


class Locker(Protocol):
    """Runs a function with the machine to itself (no command or scrape meanwhile)."""

    async def __call__(self, fn: Callable[[], T], /) -> T:
        """``fn()``, holding the machine."""
        ...


async def _unlocked(fn: Callable[[], T], /) -> T:
    return fn()


class Incoming(Closing):
    """One incoming migration into ``machine`` (built with ``incoming=True``).

    Listening starts at construction (raises :class:`MigrationError` if it cannot);
    ``on_status`` hears every status change (QEMU's MIGRATION event on the destination).
    Each section is applied to the machine through ``locked``.
    """

    def __init__(
        self,
        machine: Machine,
        uri: MigrationUri,
        on_status: Callable[[MigrationStatus], None] = lambda status: None,
        *,
        locked: Locker = _unlocked,
    ) -> None:
        self.machine = machine
        self.uri = uri
        self.on_status = on_status
        self._locked = locked
        self.status = MigrationStatus.NONE
        self.error: str | None = None
        self.listener = Listener(uri)
        self._endpoint: Endpoint | None = None
        self._loader: MachineLoader | None = None
        self._worker: asyncio.Future[Any] | None = None

    @property
    def address(self) -> MigrationUri:
        """Where the destination listens (a TCP port 0 resolved)."""
        return self.listener.address

    def _set_status(self, status: MigrationStatus) -> None:
        self.status = status
        self.on_status(status)

    async def run(self) -> LoadedMachine:
        """Wait for the source and load its stream; returns what the machine itself does not
        hold (the STATE sections, the virtio states). Raises :class:`MigrationError`."""
        self._set_status(MigrationStatus.SETUP)
        try:
            self._endpoint = await self.listener.accept()
            self._set_status(MigrationStatus.ACTIVE)
            loader = self._loader = MachineLoader(
                self.machine, StreamReader(self._endpoint.source())
            )
            ready = False
            try:
                while True:
                    record: SectionRecord | EndRecord = await self._in_thread(loader.next_record)
                    if await self._locked(functools.partial(loader.apply, record)):
                        break
                    if not ready and loader.setup_loaded:
                        # The source may switch over now: what it then waits for no longer
                        # includes mapping our memslots.
                        self._endpoint.send_ready()
                        ready = True
                return await self._locked(loader.finish)
            except BaseException:
                await self._locked(loader.cancel)
                raise
        except MemslotsError as exc:
            self.fail(str(exc) if isinstance(exc, MigrationError) else f"load failed: {exc}")
            raise MigrationError(self.error or str(exc)) from exc

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread; if this task is cancelled meanwhile, make the
        worker stop and wait for it, so that nothing writes guest memory after we return."""
        loop = asyncio.get_running_loop()
        self._worker = loop.run_in_executor(None, functools.partial(fn))
        try:
            return await asyncio.shield(self._worker)
        except asyncio.CancelledError:
            await self._stop_worker()
            raise

    async def _stop_worker(self) -> None:
        if self._loader is not None:
            self._loader.abort()
        if self._endpoint is not None:
            self._endpoint.shutdown()
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.gather(worker, return_exceptions=True)

    def fail(self, reason: str) -> None:
        """The load (or resuming the guest after it) failed: tell the source, ``failed``."""
        self.error = reason
        if self._endpoint is not None:
            self._endpoint.send_result(reason)
        self._set_status(MigrationStatus.FAILED)

    def complete(self) -> None:
        """The destination runs the migrated machine: tell the source, ``completed``."""
        if self._endpoint is not None:
            self._endpoint.send_result(None)
        self._set_status(MigrationStatus.COMPLETED)
        self.close()

    def info(self) -> dict[str, Any]:
        """``query-migrate`` on the destination (QEMU shows its status only)."""
        if self.status is MigrationStatus.NONE:
            return {}
        out: dict[str, Any] = {"status": self.status.value}
        if self.status is MigrationStatus.SETUP and self.address.transport != "file":
            address = self.address
            if address.transport == "tcp":
                entry = {"type": "inet", "host": address.host, "port": str(address.port)}
            else:
                entry = {"type": "unix", "path": address.path}
            out["socket-address"] = [entry]
        if self.error is not None:
            out["error-desc"] = self.error
        return out

    async def aclose(self) -> None:
        """Stop listening and loading; wait for a worker still reading into guest memory."""
        await self._stop_worker()
        self.close()

    def close(self) -> None:
        """Stop listening; close the connection."""
        self.listener.close()
        if self._endpoint is not None:
            self._endpoint.close()
