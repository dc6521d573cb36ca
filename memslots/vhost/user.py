"""vhost-user: a front-end for real back-ends, and the memslot consumer that keeps a back-end's
memory table equal to the fd-backed part of the guest's memory map.

Protocol facts (``../shared/reference/vhost-user.md``): 12-byte header (request, flags, size)
and payload, native endian, file descriptors as ``SCM_RIGHTS`` on the header's ``sendmsg``, at
most 8 of them per message. We negotiate in QEMU's order (GET_FEATURES, SET_OWNER,
GET_PROTOCOL_FEATURES, SET_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM with MQ,
GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS), then keep the back-end's table with one
ADD_MEM_REG / REM_MEM_REG per memslot, or with SET_MEM_TABLE (at most 8 regions) when the
back-end lacks CONFIGURE_MEM_SLOTS.

The back-ends Debian 12 ships (libvhost-user 7.2) acknowledge a failed request with 0 and then
drop the connection (qemu-storage-daemon) or exit (virtiofsd), so an ack proves nothing: every
batch of changes ends with GET_FEATURES, which always gets a reply, and EOF or EPIPE there
means the batch failed. :class:`VhostUserFrontend` keeps a shadow of exactly what the back-end
holds, because REM_MEM_REG must repeat the exact (gpa, size, uaddr) of an ADD_MEM_REG, and the
same triple must never be added twice (one REM would remove both).
"""

from __future__ import annotations

import array
import enum
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memslots.devices.dimm import PcDimm
from memslots.devices.memory_device import MemoryDevice
from memslots.devices.virtio_mem import VirtioMem
from memslots.errors import VhostDisconnectedError, VhostError
from memslots.memory.address_space import Section
from memslots.vhost.kernel import VhostBackend

if TYPE_CHECKING:
    from memslots.devices.memory_device import DeviceMemory

log = logging.getLogger("memslots.vhost.user")


class Req(enum.IntEnum):
    """Front-end requests we send (numbers from the vhost-user spec)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bits we use."""

    MQ = 0
    REPLY_ACK = 3
    CONFIG = 9
    CONFIGURE_MEM_SLOTS = 15


#: Virtio feature bits: the protocol-features extension and VERSION_1, which libvhost-user
#: requires ("virtio legacy devices aren't supported").
F_PROTOCOL_FEATURES = 30
F_VERSION_1 = 32

#: What we offer to negotiate; CONFIG is added for devices with a config space.
SUPPORTED_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
)

#: VHOST_MEMORY_BASELINE_NREGIONS: fds per message, and the limit without CONFIGURE_MEM_SLOTS.
BASELINE_NREGIONS = 8
#: VHOST_USER_MAX_RAM_SLOTS (QEMU 8.1+ on x86): QEMU never uses more than this.
MAX_RAM_SLOTS = 512
#: The largest payload libvhost-user accepts (the size of its message union).
MAX_PAYLOAD = 272

_VERSION = 0x1
_FLAG_REPLY = 0x4
_FLAG_NEED_REPLY = 0x8
_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_REGION = struct.Struct("<QQQQ")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_CONFIG_HEADER = struct.Struct("<III")


@dataclass(frozen=True, order=True)
class MemRegion:
    """One region of a back-end's memory table (the ADD_MEM_REG payload)."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int

    @property
    def key(self) -> tuple[int, int, int]:
        """(gpa, size, uaddr): what REM_MEM_REG matches on."""
        return (self.gpa, self.size, self.uaddr)

    def pack(self) -> bytes:
        """The 32-byte region layout."""
        return _REGION.pack(self.gpa, self.size, self.uaddr, self.mmap_offset)

    @classmethod
    def of(cls, section: Section) -> MemRegion:
        """The region that exposes ``section``: QEMU's own address as uaddr, the fd offset."""
        return cls(section.gpa, section.size, section.host_addr, section.fd_offset)


@dataclass(frozen=True)
class Endpoint:
    """How to reach a back-end and what to negotiate with it.

    ``config``: the device has a config space (vhost-user-blk), so CONFIG is negotiated and
    required. ``protocol_features``: what we are willing to use (a subset of
    :data:`SUPPORTED_PROTOCOL_FEATURES`). ``timeout``: seconds to wait for any reply.
    """

    path: str
    config: bool = False
    protocol_features: int = SUPPORTED_PROTOCOL_FEATURES
    timeout: float = 5.0


class VhostUserConnection:
    """One Unix-socket connection: framing, fd passing, and errors as :class:`VhostError`.

    EOF, EPIPE, ECONNRESET and timeouts raise :class:`VhostDisconnectedError`; a malformed
    reply raises :class:`VhostError`. ``messages`` and ``seconds`` count what was sent and
    the time spent in the socket calls.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.messages = 0
        self.seconds = 0.0
        self._sock: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        )
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self.close()
            raise VhostDisconnectedError(
                f"Failed to connect to '{path}': {exc.strerror or exc}"
            ) from exc

    @property
    def closed(self) -> bool:
        """True once the connection is closed."""
        return self._sock is None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise VhostDisconnectedError(f"vhost-user connection to '{self.path}' is closed")
        return self._sock

    def send(
        self, req: Req, payload: bytes = b"", fds: Iterable[int] = (), *, need_reply: bool = False
    ) -> None:
        """Send one message; ``fds`` travel with its header."""
        sock = self._socket()
        fd_list = list(fds)
        if len(fd_list) > BASELINE_NREGIONS or len(payload) > MAX_PAYLOAD:
            raise VhostError(f"vhost-user {req.name}: message too big for the back-end")
        flags = _VERSION | (_FLAG_NEED_REPLY if need_reply else 0)
        data = _HEADER.pack(req, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list))] if fd_list else []
        t0 = time.perf_counter()
        try:
            sent = sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
            if sent < len(data):
                sock.sendall(data[sent:], socket.MSG_NOSIGNAL)
        except OSError as exc:
            raise self._lost(f"sending {req.name}", exc) from exc
        finally:
            self.seconds += time.perf_counter() - t0
        self.messages += 1

    def recv_reply(self, req: Req) -> bytes:
        """Read the reply to ``req`` and return its payload."""
        header = self._recv_exact(_HEADER.size, req)
        request, flags, size = _HEADER.unpack(header)
        if request != req or not flags & _FLAG_REPLY or flags & 0x3 != _VERSION:
            raise VhostError(
                f"vhost-user back-end at '{self.path}' answered {req.name} with request "
                f"{request}, flags 0x{flags:x}"
            )
        if size > MAX_PAYLOAD:
            raise VhostError(
                f"vhost-user back-end at '{self.path}' sent a {size}-byte reply to {req.name}"
            )
        return self._recv_exact(size, req)

    def _recv_exact(self, n: int, req: Req) -> bytes:
        sock = self._socket()
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        t0 = time.perf_counter()
        try:
            while got < n:
                k = sock.recv_into(view[got:])
                if k == 0:
                    raise VhostDisconnectedError(
                        f"vhost-user back-end at '{self.path}' closed the connection "
                        f"instead of answering {req.name}"
                    )
                got += k
        except OSError as exc:
            raise self._lost(f"waiting for the reply to {req.name}", exc) from exc
        finally:
            self.seconds += time.perf_counter() - t0
        return bytes(buf)

    def _lost(self, doing: str, exc: OSError) -> VhostDisconnectedError:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return VhostDisconnectedError(f"vhost-user back-end at '{self.path}': {doing}: {why}")

    def close(self) -> None:
        """Close the socket (the back-end then drops its whole memory table)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class VhostUserFrontend:
    """A negotiated connection to a back-end, and a shadow of the memory table it holds.

    Attributes after negotiation: ``features`` (offered), ``acked_features``,
    ``protocol_features`` (negotiated), ``queue_num`` and ``max_mem_slots`` (QEMU's limit:
    ``min(GET_MAX_MEM_SLOTS, 512)``, or 8 without CONFIGURE_MEM_SLOTS). ``prior_limit`` is the
    limit validated on an earlier connection; a back-end that now reports less is refused, as
    QEMU does. Any failed or unverifiable request closes the connection, since the back-end's
    table is then unknown (a real back-end drops it with the connection).
    """

    def __init__(self, endpoint: Endpoint, *, prior_limit: int = 0) -> None:
        self.endpoint = endpoint
        self.connection = VhostUserConnection(endpoint.path, endpoint.timeout)
        #: What the back-end holds: exactly the regions it acknowledged and we verified.
        self.table: dict[tuple[int, int, int], MemRegion] = {}
        self.features = self.acked_features = self.protocol_features = 0
        self.queue_num = 1
        self.max_mem_slots = 0
        try:
            self._negotiate(prior_limit)
        except BaseException:
            self.close()
            raise

    # -- negotiation -----------------------------------------------------------------------

    def has(self, feature: ProtocolFeature) -> bool:
        """Whether a protocol feature was negotiated."""
        return bool(self.protocol_features & (1 << feature))

    def _negotiate(self, prior_limit: int) -> None:
        path = self.endpoint.path
        features = self._get_u64(Req.GET_FEATURES)
        if not features & (1 << F_VERSION_1):
            raise VhostError(
                f"vhost-user back-end at '{path}' does not offer VIRTIO_F_VERSION_1 "
                f"(features 0x{features:x}); legacy virtio is not supported"
            )
        self.features = features
        self.connection.send(Req.SET_OWNER)
        has_protocol = bool(features & (1 << F_PROTOCOL_FEATURES))
        protocol = 0
        wanted = self.endpoint.protocol_features & SUPPORTED_PROTOCOL_FEATURES
        if has_protocol:
            offered = self._get_u64(Req.GET_PROTOCOL_FEATURES)
            protocol = offered & wanted
            if self.endpoint.config:
                protocol |= offered & (1 << ProtocolFeature.CONFIG)
        if self.endpoint.config and not protocol & (1 << ProtocolFeature.CONFIG):
            raise VhostError(
                "Device expects VHOST_USER_PROTOCOL_F_CONFIG but backend does not support it. "
                f"(back-end at '{path}')"
            )
        self.acked_features = features & ((1 << F_VERSION_1) | (1 << F_PROTOCOL_FEATURES))
        self.connection.send(Req.SET_FEATURES, _U64.pack(self.acked_features))
        if has_protocol:
            self.connection.send(Req.SET_PROTOCOL_FEATURES, _U64.pack(protocol))
        self.protocol_features = protocol
        if self.has(ProtocolFeature.MQ):
            self.queue_num = self._get_u64(Req.GET_QUEUE_NUM)
        if self.has(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            slots = self._get_u64(Req.GET_MAX_MEM_SLOTS)
        else:
            slots = BASELINE_NREGIONS
        if slots < prior_limit:
            raise VhostError(
                f"The backend specified a max ram slots limit of {slots}, when the prior "
                f"validated limit was {prior_limit}. This limit should never decrease. "
                f"(back-end at '{path}')"
            )
        self.max_mem_slots = min(slots, MAX_RAM_SLOTS)

    # -- messages --------------------------------------------------------------------------

    def _get_u64(self, req: Req) -> int:
        self.connection.send(req)
        payload = self.connection.recv_reply(req)
        if len(payload) != _U64.size:
            raise VhostError(
                f"vhost-user back-end at '{self.endpoint.path}' answered {req.name} with "
                f"{len(payload)} bytes"
            )
        value: int = _U64.unpack(payload)[0]
        return value

    def _set(self, req: Req, payload: bytes = b"", fds: Iterable[int] = ()) -> None:
        """Send a request that changes state; with REPLY_ACK, wait for its ack."""
        ack = self.has(ProtocolFeature.REPLY_ACK)
        self.connection.send(req, payload, fds, need_reply=ack)
        if ack:
            status = self._reply_u64(req)
            if status != 0:
                raise VhostError(
                    f"vhost-user back-end at '{self.endpoint.path}' failed {req.name} "
                    f"(ack {status})"
                )

    def _reply_u64(self, req: Req) -> int:
        payload = self.connection.recv_reply(req)
        if len(payload) != _U64.size:
            raise VhostError(
                f"vhost-user back-end at '{self.endpoint.path}' acked {req.name} with "
                f"{len(payload)} bytes"
            )
        value: int = _U64.unpack(payload)[0]
        return value

    def _verify(self) -> None:
        """A GET_FEATURES round trip: proves that everything sent before was processed.

        libvhost-user handles messages in order and acks failures with 0 before dropping the
        connection, so a reply here is the only evidence that the requests before it worked.
        """
        features = self._get_u64(Req.GET_FEATURES)
        if features != self.features:
            raise VhostError(
                f"vhost-user back-end at '{self.endpoint.path}' now offers features "
                f"0x{features:x} instead of 0x{self.features:x}"
            )

    @contextmanager
    def _checked(self) -> Iterator[None]:
        """Close the connection when a request fails: the back-end's state is then unknown."""
        try:
            yield
        except VhostError:
            self.close()
            raise

    def ping(self) -> None:
        """Check that the back-end is still there (one GET_FEATURES round trip)."""
        with self._checked():
            self._verify()

    # -- the memory table --------------------------------------------------------------------

    @property
    def configure_mem_slots(self) -> bool:
        """True when regions are added and removed one by one (else SET_MEM_TABLE)."""
        return self.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)

    def sync(self, desired: Mapping[tuple[int, int, int], tuple[MemRegion, int]]) -> int:
        """Make the back-end hold exactly ``desired`` (key -> region and its fd).

        Removals go first, then additions, then the verification round trip. More regions
        than :attr:`max_mem_slots` are refused before anything is sent. Returns the number of
        table messages sent (0 when the back-end already holds ``desired``).
        """
        if len(desired) > self.max_mem_slots:
            raise VhostError(
                f"vhost-user back-end at '{self.endpoint.path}' supports "
                f"{self.max_mem_slots} memory regions, not {len(desired)}"
            )
        with self._checked():
            sent = (
                self._sync_regions(desired)
                if self.configure_mem_slots
                else self._sync_table(desired)
            )
            if sent:
                self._verify()
        return sent

    def _sync_regions(self, desired: Mapping[tuple[int, int, int], tuple[MemRegion, int]]) -> int:
        removes = sorted(r for k, r in self.table.items() if k not in desired)
        adds = sorted(v for k, v in desired.items() if k not in self.table)
        for region in removes:
            # No fd: the back-end matches on (gpa, size, uaddr) alone.
            self._set(Req.REM_MEM_REG, _U64.pack(0) + region.pack())
            del self.table[region.key]
        for region, fd in adds:
            self._set(Req.ADD_MEM_REG, _U64.pack(0) + region.pack(), (fd,))
            self.table[region.key] = region
        return len(removes) + len(adds)

    def _sync_table(self, desired: Mapping[tuple[int, int, int], tuple[MemRegion, int]]) -> int:
        if desired.keys() == self.table.keys():
            return 0
        entries = sorted(desired.values())
        payload = _VRING_STATE.pack(len(entries), 0) + b"".join(r.pack() for r, _ in entries)
        self._set(Req.SET_MEM_TABLE, payload, [fd for _, fd in entries])
        self.table = {r.key: r for r, _ in entries}
        return 1

    def translate(self, gpa: int, length: int) -> int:
        """Our (QEMU's) address of ``[gpa, gpa+length)``, which must lie in one region the
        back-end holds: ring addresses are given to the back-end as such addresses."""
        for r in self.table.values():
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.uaddr + gpa - r.gpa
        raise VhostError(
            f"guest memory [0x{gpa:x}, +0x{length:x}) is not in a memory region the vhost-user "
            f"back-end at '{self.endpoint.path}' holds"
        )

    # -- virtqueues and config ---------------------------------------------------------------

    def set_vring(
        self,
        index: int,
        num: int,
        rings: tuple[int, int, int],
        kick_fd: int,
        call_fd: int,
    ) -> None:
        """Set up and start virtqueue ``index`` with ``num`` entries.

        ``rings`` are the guest-physical addresses of the descriptor table, avail and used
        rings; they must lie in memory the back-end holds, since it reads ``used->idx`` as
        soon as it gets SET_VRING_ADDR.
        """
        desc, avail, used = rings
        addrs = (
            self.translate(desc, 16 * num),
            self.translate(used, 6 + 8 * num),
            self.translate(avail, 6 + 2 * num),
        )
        with self._checked():
            self._set(Req.SET_VRING_NUM, _VRING_STATE.pack(index, num))
            self._set(Req.SET_VRING_BASE, _VRING_STATE.pack(index, 0))
            self._set(Req.SET_VRING_ADDR, _VRING_ADDR.pack(index, 0, *addrs, 0))
            self._set(Req.SET_VRING_CALL, _U64.pack(index), (call_fd,))
            self._set(Req.SET_VRING_KICK, _U64.pack(index), (kick_fd,))
            if self.acked_features & (1 << F_PROTOCOL_FEATURES):
                # With protocol features, rings start disabled.
                self._set(Req.SET_VRING_ENABLE, _VRING_STATE.pack(index, 1))
            self._verify()

    def get_config(self, size: int) -> bytes:
        """GET_CONFIG: the first ``size`` bytes of the device's config space."""
        with self._checked():
            self.connection.send(Req.GET_CONFIG, _CONFIG_HEADER.pack(0, size, 0) + bytes(size))
            payload = self.connection.recv_reply(Req.GET_CONFIG)
            if len(payload) != _CONFIG_HEADER.size + size:
                raise VhostError(
                    f"vhost-user back-end at '{self.endpoint.path}' answered GET_CONFIG with "
                    f"{len(payload)} bytes"
                )
        return payload[_CONFIG_HEADER.size :]

    def close(self) -> None:
        """Close the connection; the back-end holds nothing any more."""
        self.connection.close()
        self.table.clear()


# -- the memslot consumer --------------------------------------------------------------------


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
