"""The vhost-user memslot consumer: keeps a back-end's memory table equal to the fd-backed part
of the guest's memory map, and survives the back-end's death."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from memslots.errors import VhostError
from memslots.memory.address_space import Section
from memslots.vhost.backend import VhostBackend
from memslots.vhost.user.frontend import Endpoint, VhostUserFrontend
from memslots.vhost.user.wire import MemRegion

log = logging.getLogger("memslots.vhost.user")


class ConnectionState(enum.Enum):
    """Whether a vhost-user back-end gets memory table changes."""

    CONNECTED = "connected"
    #: The back-end died or dropped us; changes are recorded and replayed by reconnect().
    DISCONNECTED = "disconnected"
    #: Detached from the machine.
    CLOSED = "closed"
    #: Described for ``memslots plan``, with the limit the user gave: never connected, sent
    #: nothing, but counted exactly as a connected one.
    PLANNED = "planned"


class VhostUserConsumer(VhostBackend):
    """A vhost-user back-end as a memslot consumer: one region per mapped fd-backed section.

    Which sections count is decided by fd-backed-ness (``RamBlock.fd_backed``), as QEMU's
    ``vhost_section`` does, so planned memory (no fd, but memfd or file memory) counts exactly as
    mapped memory does: ``plan`` and ``run`` charge a back-end the same regions.

    Changes are collected between the address space's ``begin()`` and ``commit()`` and sent
    at ``commit()``, removals first. A region beyond the back-end's limit is refused in
    ``region_add`` (the address space then undoes the batch), so more regions than the limit
    are never sent. If the back-end dies, drops the connection or fails a request, the
    consumer logs it on ``memslots.vhost.user``, turns :attr:`state` to DISCONNECTED and keeps
    recording the map without failing the commit: guest memory state never depends on a
    back-end. :meth:`reconnect` connects again, renegotiates and replays the whole table.

    How the back-end is charged for memslots memory devices reserved (QEMU's accounting or the
    opt-in precise one) is the budget's choice (:mod:`memslots.devices.budget`), not ours: like
    every consumer, this one only reports ``max``, ``used`` and ``free = max - used``.
    """

    kind = "user"

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        *,
        chardev: str | None = None,
        planned_limit: int | None = None,
    ) -> None:
        """Connect and negotiate (raises :class:`VhostError`); nothing is sent until
        :meth:`start`. ``chardev`` names the chardev the back-end is reached through.

        With ``planned_limit``, nothing is connected: the back-end is only described, with that
        limit (``plan`` cannot ask a back-end that may not be running), and stays PLANNED.
        """
        self.name = name
        self.endpoint = endpoint
        self.chardev = chardev
        self.frontend: VhostUserFrontend | None = None
        if planned_limit is None:
            self.frontend = VhostUserFrontend(endpoint)
            self.limit = self.frontend.max_mem_slots
            self.state = ConnectionState.CONNECTED
        else:
            self.limit = planned_limit
            self.state = ConnectionState.PLANNED
        #: Why the last disconnection happened.
        self.disconnect_reason: str | None = None
        self.disconnects = 0
        #: Called with the consumer whenever :attr:`state` changes (lost, reconnected, closed).
        self.state_listeners: list[Callable[[VhostUserConsumer], None]] = []
        #: Each fd-backed section and its fd (None only for planned memory).
        self._sections: dict[Section, tuple[MemRegion, int | None]] = {}
        self._started = False
        self._refused = False

    # -- accounting ----------------------------------------------------------------------------

    @property
    def max_memslots(self) -> int:
        return self.limit

    @property
    def used_memslots(self) -> int:
        return len(self._sections) + self.other_used

    def accepts(self, section: Section) -> bool:
        # A back-end can only map memory it gets a file descriptor for.
        return section.backend.fd_backed

    @property
    def regions(self) -> list[MemRegion]:
        """The table the back-end should hold (what the machine maps), by address."""
        return sorted(r for r, _ in self._sections.values())

    @property
    def connected(self) -> bool:
        """True while the back-end receives changes."""
        return self.state is ConnectionState.CONNECTED

    # -- listener ------------------------------------------------------------------------------

    def region_add(self, section: Section) -> None:
        if not self.accepts(section):
            return
        if self._started and self.used_memslots >= self.limit:
            self._refused = True
            raise VhostError(
                f"vhost back-end '{self.name}': no free memory region for '{section.name}' at "
                f"0x{section.gpa:x}: all {self.limit} are in use"
            )
        self._sections[section] = (MemRegion.of(section), section.fd)

    def region_del(self, section: Section) -> None:
        self._sections.pop(section, None)

    def commit(self) -> None:
        refused, self._refused = self._refused, False
        # After our refusal the address space replays the old view; that commit sends.
        if not refused and self._started and self.state is ConnectionState.CONNECTED:
            self._send_table()

    def _desired(self) -> dict[tuple[int, int, int], tuple[MemRegion, int]]:
        desired = {}
        for r, fd in self._sections.values():
            # Only a planned back-end sees planned memory, and it is never sent a table.
            assert fd is not None, f"vhost back-end '{self.name}': region {r} has no fd"
            desired[r.key] = (r, fd)
        return desired

    def _send_table(self) -> None:
        assert self.frontend is not None
        try:
            self.frontend.sync(self._desired())
        except VhostError as exc:
            self._lost(str(exc))

    def _lost(self, reason: str) -> None:
        if self.frontend is not None:
            self.frontend.close()
        self.state = ConnectionState.DISCONNECTED
        self.disconnect_reason = reason
        self.disconnects += 1
        log.warning(
            "vhost-user back-end '%s' disconnected: %s; guest memory is unaffected and %d "
            "regions wait for reconnect()",
            self.name,
            reason,
            len(self._sections),
        )
        self._notify()

    def _notify(self) -> None:
        for cb in list(self.state_listeners):
            cb(self)

    def refresh_fds(self) -> int:
        """Send again every region whose memory got a new file descriptor since it was sent
        (a destination that adopted a source's memory, ``HostMemory.adopt``): each is removed
        and added back with the new fd, so the back-end maps the same memory as we do.
        Returns how many regions were resent."""
        stale = [
            sec for sec, (_, fd) in self._sections.items() if sec.fd is not None and sec.fd != fd
        ]
        for sec in stale:
            fd = sec.fd
            assert fd is not None
            self._sections[sec] = (MemRegion.of(sec), fd)
        if stale and self._started and self.state is ConnectionState.CONNECTED:
            assert self.frontend is not None
            keys = {MemRegion.of(sec).key for sec in stale}
            desired = self._desired()
            try:
                self.frontend.sync({k: v for k, v in desired.items() if k not in keys})
                self.frontend.sync(desired)
            except VhostError as exc:
                self._lost(str(exc))
        return len(stale)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Send the current table; from now on keep the back-end in step (raises if that
        first table cannot be delivered)."""
        self._started = True
        if self.state is ConnectionState.CONNECTED:
            assert self.frontend is not None
            try:
                self.frontend.sync(self._desired())
            except VhostError as exc:
                self._lost(str(exc))
                raise

    def stop(self) -> None:
        """Stop sending changes (the table is still recorded)."""
        self._started = False

    def check(self, *, unasked_only: bool = False) -> ConnectionState:
        """Ask a connected back-end whether it is still there (one round trip); with
        ``unasked_only``, only if its connection has something nobody asked for (a hang-up,
        not the reply another thread already read)."""
        if unasked_only and (self.frontend is None or not self.frontend.connection.unasked()):
            return self.state
        if self.state is ConnectionState.CONNECTED:
            assert self.frontend is not None
            try:
                self.frontend.ping()
            except VhostError as exc:
                self._lost(str(exc))
        return self.state

    def interrupt(self) -> None:
        """End a wait for the back-end now; callable from any thread (at shutdown).

        The request waiting fails as if the back-end had died, so it is marked disconnected and
        the memory-map commit goes on without it.
        """
        frontend = self.frontend
        if frontend is not None:
            frontend.connection.interrupt()

    def reconnect(self) -> None:
        """Connect again, renegotiate and replay the whole table (after a restart of the
        back-end, or when it dropped the connection but lives on).

        The back-end must not report a lower limit than before. On failure the state stays
        (or becomes) DISCONNECTED and the error is raised.
        """
        if self.state is ConnectionState.CLOSED:
            raise VhostError(f"vhost back-end '{self.name}' is closed")
        if self.state is ConnectionState.PLANNED:
            raise VhostError(f"vhost back-end '{self.name}' is only planned: it has no connection")
        if self.frontend is not None:
            self.frontend.close()
            self.frontend = None
        self.state = ConnectionState.DISCONNECTED
        frontend = VhostUserFrontend(self.endpoint, prior_limit=self.limit)
        self.frontend = frontend
        self.limit = frontend.max_mem_slots
        if self._started:
            try:
                frontend.sync(self._desired())
            except VhostError as exc:
                self._lost(str(exc))
                raise
        self.state = ConnectionState.CONNECTED
        log.info(
            "vhost-user back-end '%s' reconnected to '%s': replayed %d regions",
            self.name,
            self.endpoint.path,
            len(frontend.table),
        )
        self._notify()

    def close(self) -> None:
        """Close the connection for good."""
        self._started = False
        if self.frontend is not None:
            self.frontend.close()
            self.frontend = None
        self.state = ConnectionState.CLOSED
        self._notify()
