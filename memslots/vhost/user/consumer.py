"""The vhost-user memslot consumer: keeps a back-end's memory table equal to the fd-backed part
of the guest's memory map, and survives the back-end's death."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from memslots.devices.dimm import PcDimm
from memslots.devices.memory_device import MemoryDevice
from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import VhostError
from memslots.memory.address_space import Section
from memslots.vhost.backend import VhostBackend
from memslots.vhost.user.frontend import Endpoint, VhostUserFrontend
from memslots.vhost.user.wire import MemRegion

if TYPE_CHECKING:
    from memslots.devices.memory_device import DeviceMemory

log = logging.getLogger("memslots.vhost.user")


class ConnectionState(enum.Enum):
    """Whether a vhost-user back-end gets memory table changes."""

    CONNECTED = "connected"
    #: The back-end died or dropped us; changes are recorded and replayed by reconnect().
    DISCONNECTED = "disconnected"
    #: Detached from the machine.
    CLOSED = "closed"


def _has_fd_memory(dev: MemoryDevice) -> bool:
    memdev = dev.memdev if isinstance(dev, VirtioMem | PcDimm) else None
    # A device we cannot look into is charged, as QEMU charges every device.
    return memdev is None or memdev.memory.fd_backed


def fd_reserved_memslots(device_memory: DeviceMemory) -> int:
    """Memslots reserved by memory devices with fd-backed memory: ``required - mapped`` per
    device, summed over those devices. These are the only reserved memslots a vhost-user
    back-end will ever have to map."""
    sections = device_memory.address_space.sections
    total = 0
    for dev in device_memory.devices:
        mr = dev.get_memory_region()
        if mr is None or not _has_fd_memory(dev):
            continue
        lo = dev.get_addr()
        mapped = sum(1 for s in sections if lo <= s.gpa < lo + mr.size)
        total += max(0, dev.get_memslots() - mapped)
    return total


class VhostUserConsumer(VhostBackend):
    """A vhost-user back-end as a memslot consumer: one region per mapped fd-backed section.

    Changes are collected between the address space's ``begin()`` and ``commit()`` and sent
    at ``commit()``, removals first. A region beyond the back-end's limit is refused in
    ``region_add`` (the address space then undoes the batch), so more regions than the limit
    are never sent. If the back-end dies, drops the connection or fails a request, the
    consumer logs it on ``memslots.vhost.user``, turns :attr:`state` to DISCONNECTED and keeps
    recording the map without failing the commit: guest memory state never depends on a
    back-end. :meth:`reconnect` connects again, renegotiates and replays the whole table.

    **Precise accounting** (``precise=True``, beyond QEMU; the default is QEMU's): QEMU
    charges a vhost back-end for every memslot memory devices have reserved and refuses
    auto-decided memslots next to any back-end with fewer than 509 (Debian 12's back-ends
    have 32), so such a machine falls back to one memslot per device. In precise accounting
    the back-end is charged only for what it will really map: regions of fd-backed memory
    that are mapped, plus the memslots reserved by devices whose memory has an fd. It takes
    no part in the 509 rules; instead the memory-device layer's decision and checks are
    bounded by its exact free count, so dynamic memslots work beside it and its limit is
    never exceeded. The trade-offs:

    * the same command line decides differently from QEMU (other memslot sizes and counts);
    * a device may take every free region, leaving none for later fd-backed devices or a
      second back-end, where QEMU's 509 rule keeps headroom;
    * the memory-device layer asks for one free count for any device, so a device without
      an fd is still bounded by this back-end's free regions when it decides (though never
      charged once plugged);
    * the layer subtracts every reserved memslot from that free count, so
      :attr:`free_memslots` adds back the reservations of fd-less devices and can exceed
      ``max - used``;
    * libvhost-user 7.2 maps each region from file offset 0 to its end, so many memslots cut
      from one memfd cost the back-end virtual address space (not memory) of about the sum of
      their end offsets.
    """

    kind = "user"

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        *,
        precise: bool = False,
        device_memory: DeviceMemory | None = None,
        chardev: str | None = None,
    ) -> None:
        """Connect and negotiate (raises :class:`VhostError`); nothing is sent until
        :meth:`start`. ``device_memory`` is needed for precise accounting; ``chardev`` names
        the chardev the back-end is reached through."""
        self.name = name
        self.endpoint = endpoint
        self.precise = precise
        self.device_memory = device_memory
        self.chardev = chardev
        self.frontend: VhostUserFrontend | None = VhostUserFrontend(endpoint)
        self.limit = self.frontend.max_mem_slots
        self.state = ConnectionState.CONNECTED
        #: Why the last disconnection happened.
        self.disconnect_reason: str | None = None
        self.disconnects = 0
        #: Called with the consumer whenever :attr:`state` changes (lost, reconnected, closed).
        self.state_listeners: list[Callable[[VhostUserConsumer], None]] = []
        self._sections: dict[Section, tuple[MemRegion, int]] = {}
        self._started = False
        self._refused = False

    # -- accounting ----------------------------------------------------------------------------

    @property
    def max_memslots(self) -> int:
        return self.limit

    @property
    def used_memslots(self) -> int:
        return len(self._sections) + self.other_used

    @property
    def free_memslots(self) -> int:
        free = max(0, self.limit - self.used_memslots)
        if not self.precise or self.device_memory is None:
            return free
        dm = self.device_memory
        # The memory-device layer subtracts every reserved memslot from this count; give
        # back those this back-end will never map.
        return free + max(0, dm.reserved_memslots - self.charged_reserved(dm))

    def charged_reserved(self, device_memory: DeviceMemory) -> int:
        """All reserved memslots (QEMU), or only those of fd-backed devices (precise)."""
        if self.precise:
            return fd_reserved_memslots(device_memory)
        return device_memory.reserved_memslots

    def accepts(self, section: Section) -> bool:
        # A back-end can only map memory it gets a file descriptor for.
        return section.fd is not None

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
        fd = section.fd
        if fd is None:
            return
        if self._started and self.used_memslots >= self.limit:
            self._refused = True
            raise VhostError(
                f"vhost back-end '{self.name}': no free memory region for '{section.name}' at "
                f"0x{section.gpa:x}: all {self.limit} are in use"
            )
        self._sections[section] = (MemRegion.of(section), fd)

    def region_del(self, section: Section) -> None:
        self._sections.pop(section, None)

    def commit(self) -> None:
        refused, self._refused = self._refused, False
        # After our refusal the address space replays the old view; that commit sends.
        if not refused and self._started and self.state is ConnectionState.CONNECTED:
            self._send_table()

    def _desired(self) -> dict[tuple[int, int, int], tuple[MemRegion, int]]:
        return {r.key: (r, fd) for r, fd in self._sections.values()}

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

    def check(self) -> ConnectionState:
        """Ask a connected back-end whether it is still there (one round trip)."""
        if self.state is ConnectionState.CONNECTED:
            assert self.frontend is not None
            try:
                self.frontend.ping()
            except VhostError as exc:
                self._lost(str(exc))
        return self.state

    def reconnect(self) -> None:
        """Connect again, renegotiate and replay the whole table (after a restart of the
        back-end, or when it dropped the connection but lives on).

        The back-end must not report a lower limit than before. On failure the state stays
        (or becomes) DISCONNECTED and the error is raised.
        """
        if self.state is ConnectionState.CLOSED:
            raise VhostError(f"vhost back-end '{self.name}' is closed")
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
