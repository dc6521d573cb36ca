"""vhost-user on the wire: requests, protocol features, message framing and the memory region.

Protocol facts (``../shared/reference/vhost-user.md``): 12-byte header (request, flags, size)
and payload, native endian, file descriptors as ``SCM_RIGHTS`` on the header's ``sendmsg``, at
most 8 of them per message. :class:`VhostUserConnection` is one Unix-socket connection that
frames messages and passes fds; what to send when is :mod:`memslots.vhost.user.frontend`'s.
"""

from __future__ import annotations

import array
import contextlib
import enum
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from memslots.errors import VhostDisconnectedError, VhostError
from memslots.memory.address_space import Section


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
U64 = struct.Struct("<Q")
REGION = struct.Struct("<QQQQ")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
CONFIG_HEADER = struct.Struct("<III")


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
        return REGION.pack(self.gpa, self.size, self.uaddr, self.mmap_offset)

    @classmethod
    def of(cls, section: Section) -> MemRegion:
        """The region that exposes ``section``: QEMU's own address as uaddr, the fd offset."""
        return cls(section.gpa, section.size, section.host_addr, section.fd_offset)


class VhostUserConnection:
    """One Unix-socket connection: framing, fd passing, and errors as :class:`VhostError`.

    EOF, EPIPE, ECONNRESET and timeouts raise :class:`VhostDisconnectedError`; a malformed
    reply raises :class:`VhostError`. ``messages`` and ``seconds`` count what was sent and
    the time spent in the socket calls. ``close_listeners`` are called once, just before the
    socket is closed (whoever watches its descriptor lets go while the number is still ours).
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.messages = 0
        self.seconds = 0.0
        self.close_listeners: list[Callable[[], None]] = []
        #: Set by :meth:`interrupt`.
        self.interrupted = False
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

    def fileno(self) -> int:
        """The socket's descriptor (raises :class:`VhostDisconnectedError` once closed)."""
        return self._socket().fileno()

    def unasked(self) -> bool:
        """Whether something waits to be read that nobody asked for: bytes or the back-end's
        hang-up (call it with no reply outstanding; it never blocks)."""
        sock = self._sock
        if sock is None:
            return False
        # poll, not recv(MSG_DONTWAIT): a socket with a timeout waits before it receives.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))

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
                    if self.interrupted:
                        raise VhostDisconnectedError(
                            f"vhost-user back-end at '{self.path}': waiting for the reply to "
                            f"{req.name}: interrupted"
                        )
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
        if self.interrupted:
            why = "interrupted"
        return VhostDisconnectedError(f"vhost-user back-end at '{self.path}': {doing}: {why}")

    def interrupt(self) -> None:
        """End any wait for the back-end now; callable from any thread.

        The socket is shut down, so a call waiting for a reply fails at once, as do later ones
        (:class:`VhostDisconnectedError`, "interrupted"); the socket stays open until
        :meth:`close`.
        """
        sock = self._sock
        if sock is not None:
            self.interrupted = True
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket (the back-end then drops its whole memory table)."""
        if self._sock is not None:
            listeners, self.close_listeners = self.close_listeners, []
            for cb in listeners:
                cb()
            self._sock.close()
            self._sock = None
