"""Where a migration stream goes and comes from: sockets, file descriptors, memory.

A :class:`Sink` takes a list of buffers and sends all of them, in order, with as few system
calls as it can (``sendmsg``/``writev`` scatter-gather, so the stream's small headers travel
together with the pages they describe, straight from guest memory). A :class:`Source` reads
into a caller's buffer (``recv_into``/``readv``), so pages land directly in guest memory.

Over a Unix socket, file descriptors travel too (SCM_RIGHTS, :class:`FdPassing`): a sink sends
them with the first byte of the buffers they belong to, and the source keeps what it receives
(:meth:`SocketSource.take_fds`) -- how a local live update hands shared memory over.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from memslots.closing import Closing
from memslots.errors import MigrationError
from memslots.options import MigrationUri

Buffer = bytes | bytearray | memoryview

#: Most buffers one sendmsg/writev takes (Linux IOV_MAX).
IOV_MAX = 1024
#: Most file descriptors one message of the stream may carry.
MAX_FDS = 64
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


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


@runtime_checkable
class FdPassing(Protocol):
    """A sink that can send file descriptors along with bytes (a Unix socket)."""

    def send_fds(self, parts: Sequence[Buffer], fds: Sequence[int]) -> None:
        """Send ``parts`` like :meth:`Sink.send`, with ``fds`` attached to their first byte."""
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
        self.send_fds(parts, ())

    def send_fds(self, parts: Sequence[Buffer], fds: Sequence[int]) -> None:
        """Send ``parts``; ``fds`` (Unix sockets only) go with the first byte."""
        views = _views(parts)
        if fds and self.sock.family != socket.AF_UNIX:
            raise MigrationError("file descriptors can only be passed over a unix: socket")
        if len(fds) > MAX_FDS:
            raise MigrationError(f"cannot pass {len(fds)} file descriptors (at most {MAX_FDS})")
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        try:
            while views:
                sent = self.sock.sendmsg(views[:IOV_MAX], ancillary)
                ancillary = []
                views = _advance(views, sent)
        except OSError as exc:
            raise MigrationError(f"Unable to write to socket: {exc.strerror or exc}") from exc


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
    kernel's default). A Unix socket is read with ``recvmsg_into``, so that file descriptors
    sent along are kept (:meth:`take_fds`) rather than dropped by the kernel."""

    def __init__(self, sock: socket.socket, *, buffer_size: int = 0) -> None:
        self.sock = sock
        self._unix = sock.family == socket.AF_UNIX
        self._fds: list[int] = []
        size_socket_buffer(sock, socket.SO_RCVBUF, buffer_size)

    def recv_into(self, view: memoryview) -> int:
        try:
            if not self._unix:
                return self.sock.recv_into(view)
            n, ancdata, flags, _ = self.sock.recvmsg_into([view], _FD_SPACE)
        except ConnectionResetError:
            # A source that died with our "ready" unread resets the connection instead of
            # closing it: the stream ended there, as with a close.
            return 0
        except OSError as exc:
            raise MigrationError(f"migration stream: cannot receive: {exc}") from exc
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds += fds.tolist()
        if flags & socket.MSG_CTRUNC:
            raise MigrationError(
                f"migration stream: more than {MAX_FDS} file descriptors in one message"
            )
        return n

    def take_fds(self) -> list[int]:
        """The file descriptors received so far, in order; they are the caller's now."""
        fds, self._fds = self._fds, []
        return fds

    def close_fds(self) -> None:
        """Close received file descriptors nobody took."""
        for fd in self.take_fds():
            with contextlib.suppress(OSError):
                os.close(fd)


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


# -- connections for a URI -----------------------------------------------------------------------

#: The destination's answer after the END record: 0 and nothing else (loaded, running), or 1
#: and a u32-length-prefixed UTF-8 message (the load failed: why). Before it, once, 2: the
#: setup (CONFIG and every early state) is loaded, the source may switch over (as QEMU's
#: switchover-ack).
_RESULT_OK = b"\x00"
_RESULT_FAILED = b"\x01"
_READY = b"\x02"


class Endpoint(Closing):
    """One end of a migration connection: a connected socket or an open file, with the sink
    (source side) or source (destination side) that reads or writes the stream over it.

    Sockets carry the destination's result back (:meth:`send_result`, :meth:`read_result`),
    as QEMU's return path does; a file has none. :meth:`shutdown` may be called from another
    thread to make blocking I/O on the endpoint fail at once (cancel, quit).
    """

    def __init__(self, *, sock: socket.socket | None = None, fd: int | None = None) -> None:
        self.sock = sock
        self.fd = fd
        self._closed = False

    @property
    def has_result(self) -> bool:
        """True for a socket: the destination answers after END."""
        return self.sock is not None

    def sink(self) -> SocketSink | FdSink:
        """Where the source writes the stream."""
        if self.sock is not None:
            return SocketSink(self.sock)
        assert self.fd is not None
        return FdSink(self.fd)

    def source(self) -> SocketSource | FdSource:
        """Where the destination reads the stream."""
        if self.sock is not None:
            return SocketSource(self.sock)
        assert self.fd is not None
        return FdSource(self.fd)

    def send_result(self, error: str | None) -> None:
        """The destination's answer: None for success, else why it failed (best effort: a
        source that is gone does not hear it)."""
        if self.sock is None:
            return
        if error is None:
            data = _RESULT_OK
        else:
            text = error.encode()[:65536]
            data = _RESULT_FAILED + len(text).to_bytes(4, "little") + text
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def send_ready(self) -> None:
        """The destination loaded the setup (best effort, as :meth:`send_result`)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendall(_READY)

    def read_ready(self) -> None:
        """Wait for the destination's :meth:`send_ready`; raises :class:`MigrationError` with
        its message if it failed instead, or if the connection ended."""
        assert self.sock is not None
        head = self._recv_exactly(1)
        if head == _READY:
            return
        if head == _RESULT_FAILED:
            length = int.from_bytes(self._recv_exactly(4), "little")
            reason = self._recv_exactly(length).decode(errors="replace")
            raise MigrationError(f"the destination failed: {reason}")
        raise MigrationError(f"the destination answered {head!r} before loading the setup")

    def read_result(self, timeout: float | None = None) -> str | None:
        """The destination's answer: None if it loaded the stream, else its message (a ready
        message not read yet is passed over).

        Raises :class:`MigrationError` if the connection ended without an answer (or none
        came within ``timeout`` seconds).
        """
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            head = self._recv_exactly(1)
            if head == _READY:
                head = self._recv_exactly(1)
            if head == _RESULT_OK:
                return None
            if head != _RESULT_FAILED:
                raise MigrationError(f"the destination answered {head!r}, not a result")
            length = int.from_bytes(self._recv_exactly(4), "little")
            return self._recv_exactly(length).decode(errors="replace")
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(None)

    def _recv_exactly(self, n: int) -> bytes:
        assert self.sock is not None
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except TimeoutError:
                raise MigrationError("the destination did not answer in time") from None
            except OSError as exc:
                raise MigrationError(
                    f"the destination closed the connection without an answer: {exc.strerror}"
                ) from exc
            if not chunk:
                raise MigrationError(
                    "the destination closed the connection without confirming the migration"
                )
            out += chunk
        return bytes(out)

    def shutdown(self) -> None:
        """Make blocking I/O on a socket fail now (from any thread)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket or file."""
        if self._closed:
            return
        self._closed = True
        if self.sock is not None:
            self.sock.close()
        if self.fd is not None:
            os.close(self.fd)


def _socket_for(uri: MigrationUri) -> tuple[socket.socket, str | tuple[str, int]]:
    if uri.transport == "unix":
        assert uri.path is not None
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), uri.path
    assert uri.host is not None and uri.port is not None
    family = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM), (uri.host, uri.port)


async def connect(uri: MigrationUri) -> Endpoint:
    """The source's end for ``uri``: a connected socket, or the file created (truncated) for
    writing. Raises :class:`MigrationError` with the reason."""
    if uri.transport == "file":
        assert uri.path is not None
        try:
            fd = os.open(uri.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MigrationError(f"Failed to open file '{uri.path}': {exc.strerror}") from exc
        return Endpoint(fd=fd)
    sock, address = _socket_for(uri)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except OSError as exc:
        sock.close()
        raise MigrationError(f"Failed to connect to '{uri}': {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    sock.setblocking(True)
    return Endpoint(sock=sock)


class Listener(Closing):
    """The destination's listening end for ``uri`` (a Unix or TCP socket), or the file it
    reads. A Unix socket path is removed again on :meth:`close`."""

    def __init__(self, uri: MigrationUri) -> None:
        self.uri = uri
        self._sock: socket.socket | None = None
        self._path: str | None = None
        if uri.transport == "file":
            return
        sock, address = _socket_for(uri)
        try:
            if uri.transport == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            if uri.transport == "unix":
                self._path = uri.path
            sock.listen(1)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise MigrationError(f"Failed to listen on '{uri}': {exc.strerror or exc}") from exc
        self._sock = sock

    @property
    def address(self) -> MigrationUri:
        """Where it listens (a TCP port 0 resolved to the port it got)."""
        if self._sock is not None and self.uri.transport == "tcp":
            host, port = self._sock.getsockname()[:2]
            return MigrationUri("tcp", host=str(host), port=int(port))
        return self.uri

    async def accept(self) -> Endpoint:
        """Wait for the source (a file is opened at once); one connection only."""
        if self.uri.transport == "file":
            assert self.uri.path is not None
            try:
                fd = os.open(self.uri.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise MigrationError(
                    f"Failed to open file '{self.uri.path}': {exc.strerror}"
                ) from exc
            return Endpoint(fd=fd)
        assert self._sock is not None
        conn, _ = await asyncio.get_running_loop().sock_accept(self._sock)
        conn.setblocking(True)
        self.close()  # QEMU takes one connection and stops listening
        return Endpoint(sock=conn)

    def close(self) -> None:
        """Stop listening; remove the Unix socket's path."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None
