"""Where a migration stream goes and comes from: sockets, file descriptors, memory.

A :class:`Sink` takes a list of buffers and sends all of them, in order, with as few system
calls as it can (``sendmsg``/``writev`` scatter-gather, so the stream's small headers travel
together with the pages they describe, straight from guest memory). A :class:`Source` reads
into a caller's buffer (``recv_into``/``readv``), so pages land directly in guest memory.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from typing import Protocol

from memslots.errors import MigrationError

Buffer = bytes | bytearray | memoryview

#: Most buffers one sendmsg/writev takes (Linux IOV_MAX).
IOV_MAX = 1024


def size_socket_buffer(sock: socket.socket, option: int, size: int) -> None:
    """Ask for a ``size``-byte send or receive buffer (best effort: the kernel caps it at
    net.core.wmem_max/rmem_max; 0 leaves the kernel's default). Measured here, 4 MiB buffers
    made both a raw copy and the stream slower than the default (~200 KiB), so the stream
    leaves them alone unless told otherwise."""
    if not size:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, option, size)


class Sink(Protocol):
    """Sends whole lists of buffers, in order."""

    def send(self, parts: Sequence[Buffer]) -> None:
        """Send every byte of ``parts``; raise :class:`MigrationError` if it cannot."""
        ...


class Source(Protocol):
    """Reads into buffers."""

    def recv_into(self, view: memoryview) -> int:
        """Read up to ``len(view)`` bytes into ``view``; 0 at the end of the stream."""
        ...


def _advance(parts: list[memoryview], sent: int) -> list[memoryview]:
    """Drop the first ``sent`` bytes from ``parts``."""
    i = 0
    while i < len(parts) and sent >= parts[i].nbytes:
        sent -= parts[i].nbytes
        i += 1
    rest = parts[i:]
    if sent and rest:
        rest[0] = rest[0][sent:]
    return rest


def _views(parts: Sequence[Buffer]) -> list[memoryview]:
    out = []
    for p in parts:
        view = p if isinstance(p, memoryview) else memoryview(p)
        if view.nbytes:
            out.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
    return out


class SocketSink:
    """A stream socket (AF_UNIX or TCP), written with ``sendmsg`` (``buffer_size``: SO_SNDBUF,
    0 for the kernel's default). TCP gets TCP_NODELAY: the stream ends with small writes (the
    last checksum, END) that must not wait for a delayed ACK."""

    def __init__(self, sock: socket.socket, *, buffer_size: int = 0) -> None:
        self.sock = sock
        size_socket_buffer(sock, socket.SO_SNDBUF, buffer_size)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, parts: Sequence[Buffer]) -> None:
        views = _views(parts)
        try:
            while views:
                sent = self.sock.sendmsg(views[:IOV_MAX])
                views = _advance(views, sent)
        except OSError as exc:
            raise MigrationError(f"migration stream: cannot send: {exc}") from exc


class FdSink:
    """A file descriptor (a file or a pipe), written with ``writev``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, parts: Sequence[Buffer]) -> None:
        views = _views(parts)
        try:
            while views:
                written = os.writev(self.fd, views[:IOV_MAX])
                views = _advance(views, written)
        except OSError as exc:
            raise MigrationError(f"migration stream: cannot write: {exc}") from exc


class MemorySink:
    """Collects the stream in memory (tests; small snapshots)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def send(self, parts: Sequence[Buffer]) -> None:
        for p in parts:
            self.data += p


class SocketSource:
    """A stream socket, read with ``recv_into`` (``buffer_size``: SO_RCVBUF, 0 for the
    kernel's default)."""

    def __init__(self, sock: socket.socket, *, buffer_size: int = 0) -> None:
        self.sock = sock
        size_socket_buffer(sock, socket.SO_RCVBUF, buffer_size)

    def recv_into(self, view: memoryview) -> int:
        try:
            return self.sock.recv_into(view)
        except OSError as exc:
            raise MigrationError(f"migration stream: cannot receive: {exc}") from exc


class FdSource:
    """A file descriptor, read with ``readv``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def recv_into(self, view: memoryview) -> int:
        try:
            return os.readv(self.fd, [view])
        except OSError as exc:
            raise MigrationError(f"migration stream: cannot read: {exc}") from exc


class BytesSource:
    """Reads from bytes in memory, at most ``chunk`` bytes per call (tests use small chunks
    to exercise every partial read)."""

    def __init__(self, data: Buffer, chunk: int = 1 << 20) -> None:
        self.data = memoryview(data).cast("B")
        self.pos = 0
        self.chunk = chunk

    def recv_into(self, view: memoryview) -> int:
        n = min(len(view), self.chunk, self.data.nbytes - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n
