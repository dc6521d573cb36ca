"""vhost-user back-ends for tests: Debian's real ones as processes, and a fake one in a thread.

* :class:`QemuStorageDaemon` (a vhost-user-blk export of a patterned disk image) and
  :class:`Virtiofsd` (QEMU 7.2's C virtiofsd) run in a temporary directory and are always
  stopped again; virtiofsd's ``/var/run/virtiofsd/*.pid`` leftover is removed.
* :func:`memfd_mappings` lists the memfds a process maps (``/proc/<pid>/maps``), which is how
  the tests see a back-end's memory table from the outside. With ``sandbox=namespace``
  virtiofsd serves from a forked child, found through ``/proc/<pid>/task/*/children``.
* :class:`FakeBackend` speaks just enough vhost-user, like libvhost-user 7.2 (including its
  ack-0-then-hang-up on failures), with knobs for what the real ones cannot be made to do.
"""

from __future__ import annotations

import array
import contextlib
import glob
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from memslots.vhost.user.wire import F_PROTOCOL_FEATURES, F_VERSION_1, ProtocolFeature, Req

QSD = "/usr/bin/qemu-storage-daemon"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
VIRTIOFSD_PID_DIR = "/var/run/virtiofsd"
SECTOR = 512


def sector_pattern(first: int, count: int) -> bytes:
    """The disk contents of sectors ``[first, first+count)``: each names its own number."""
    return b"".join(
        struct.pack("<Q", s).ljust(16, b"#") * (SECTOR // 16) for s in range(first, first + count)
    )


# -- /proc -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapped:
    """One file-backed VMA of a process."""

    start: int
    end: int
    offset: int
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start


def memfd_mappings(pid: int, prefix: str = "/memfd:memslots:") -> list[Mapped]:
    """The VMAs of ``pid`` that map one of our memfds (named ``memslots:<backend id>``)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith(prefix):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append(Mapped(lo, hi, int(parts[2], 16), int(parts[4]), parts[5].rstrip("\n")))
    return out


def listening(path: str) -> bool:
    """Whether a Unix socket is listening at ``path`` (``__SO_ACCEPTCON`` in /proc/net/unix).

    The socket file appears at bind(), before listen(); probing with a connection instead
    would use up virtiofsd, which serves exactly one.
    """
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                return True
    return False


def children(pid: int) -> list[int]:
    """Child processes of ``pid``, from every thread's ``children`` file."""
    kids: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(FileNotFoundError), open(path) as f:  # a thread may be gone
            kids += [int(x) for x in f.read().split()]
    return kids


def wait_until(condition: Callable[[], bool], timeout: float = 5) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; its last value.

    A back-end unmaps a closed connection's memory and writes its log on its own time.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


# -- real back-ends --------------------------------------------------------------------------


class BackendProcess:
    """A back-end process serving a Unix socket in ``workdir``; a context manager."""

    name = "backend"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket_path = str(workdir / f"{self.name}.sock")
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Self:
        """Start the process and wait until its socket listens."""
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not listening(self.socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start: {self.log()}")
            time.sleep(0.005)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def memory_pid(self) -> int:
        """The process that maps guest memory."""
        return self.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> int:
        """SIGKILL the process (and wait for it); returns its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(5)

    def wait(self, timeout: float = 5) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Terminate the process (kill it if it lingers) and clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class QemuStorageDaemon(BackendProcess):
    """qemu-storage-daemon exporting a ``disk_size`` image (see :func:`sector_pattern`) as
    vhost-user-blk. It serves one client at a time and survives disconnections."""

    name = "qsd"

    def __init__(self, workdir: Path, disk_size: int = 1 << 20) -> None:
        super().__init__(workdir)
        self.disk = workdir / "disk.img"
        self.disk.write_bytes(sector_pattern(0, disk_size // SECTOR))

    def argv(self) -> list[str]:
        return [
            QSD,
            "--blockdev",
            f"driver=file,node-name=file0,filename={self.disk}",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
            f"addr.path={self.socket_path},writable=on",
        ]


class Virtiofsd(BackendProcess):
    """QEMU 7.2's virtiofsd sharing an empty directory. It serves one connection and exits
    when it ends or on any error. ``sandbox=namespace`` forks the serving child."""

    name = "virtiofsd"

    def __init__(self, workdir: Path, sandbox: str = "chroot") -> None:
        super().__init__(workdir)
        self.sandbox = sandbox
        self.shared = workdir / "shared"
        self.shared.mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        return [
            VIRTIOFSD,
            f"--socket-path={self.socket_path}",
            "-o",
            f"source={self.shared}",
            "-o",
            "cache=none",
            "-o",
            f"sandbox={self.sandbox}",
        ]

    @property
    def pid_file(self) -> str:
        """Where virtiofsd records its pid: the socket path with '/' turned into '.'."""
        return os.path.join(VIRTIOFSD_PID_DIR, self.socket_path.replace("/", ".") + ".pid")

    @property
    def memory_pid(self) -> int:
        if self.sandbox != "namespace":
            return self.pid
        # The child exists once a front-end has connected.
        deadline = time.monotonic() + 5
        while not (kids := children(self.pid)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"virtiofsd {self.pid} has no child: {self.log()}")
            time.sleep(0.005)
        return kids[0]

    def stop(self) -> None:
        try:
            # A sandbox child outlives a killed parent: end it first, while it can be found.
            for kid in children(self.pid) if self.alive() else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)
            super().stop()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pid_file)


# -- a fake back-end -------------------------------------------------------------------------

_HDR = struct.Struct("<III")
_REPLY = 0x5  # version 1 | REPLY


@dataclass
class FakeBackend:
    """A vhost-user back-end in a thread, serving one connection at a time on ``path``.

    It behaves like libvhost-user 7.2 where that matters: an ADD beyond ``max_mem_slots`` or
    a REM of an unknown region is acked with 0 and then the connection is dropped. Knobs:
    ``protocol_features`` offered, ``max_mem_slots``, ``nack`` (requests acked with 1, an
    honest failure), ``hang_up_after`` (drop the connection after that many requests) and
    ``mute_after`` (stop answering after that many requests, as a hung back-end would).
    ``log`` records request names; ``table`` the (gpa, size, uaddr) triples held.
    """

    path: str
    features: int = (1 << F_VERSION_1) | (1 << F_PROTOCOL_FEATURES)
    protocol_features: int = (
        (1 << ProtocolFeature.MQ)
        | (1 << ProtocolFeature.REPLY_ACK)
        | (1 << ProtocolFeature.CONFIG)
        | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    )
    max_mem_slots: int = 32
    nack: set[Req] = field(default_factory=set)
    hang_up_after: int | None = None
    mute_after: int | None = None
    log: list[str] = field(default_factory=list)
    table: list[tuple[int, int, int]] = field(default_factory=list)
    acked_protocol_features: int | None = None
    connections: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(4)
        self._conn: socket.socket | None = None
        self._session_over = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conn = conn
            self._session_over.clear()
            self.connections += 1
            self.table.clear()  # a new connection starts empty, as libvhost-user's does
            try:
                self._session(conn)
            except OSError:
                pass
            finally:
                conn.close()
                self._session_over.set()

    def wait_session_end(self, timeout: float = 5) -> None:
        """Wait until the current connection is over, so that ``log`` is complete."""
        assert self._session_over.wait(timeout), "the connection did not end"

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionResetError
            data += chunk
        return data

    def _session(self, conn: socket.socket) -> None:
        handled = 0
        while True:
            msg, anc, _, _ = conn.recvmsg(_HDR.size, socket.CMSG_SPACE(8 * 4))
            if not msg:
                return
            msg += self._recv(conn, _HDR.size - len(msg))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for fd in array.array("i", data[: len(data) - len(data) % 4]):
                        os.close(fd)
            req, flags, size = _HDR.unpack(msg)
            payload = self._recv(conn, size)
            name = Req(req).name
            self.log.append(name)
            if self.mute_after is not None and handled >= self.mute_after:
                continue
            if not self._handle(conn, Req(req), flags, payload):
                return
            handled += 1
            if self.hang_up_after is not None and handled >= self.hang_up_after:
                return

    def _reply(self, conn: socket.socket, req: Req, payload: bytes) -> None:
        conn.sendall(_HDR.pack(req, _REPLY, len(payload)) + payload)

    def _handle(self, conn: socket.socket, req: Req, flags: int, payload: bytes) -> bool:
        """Process one request; False ends the connection."""
        u64 = struct.Struct("<Q")
        if req is Req.GET_FEATURES:
            self._reply(conn, req, u64.pack(self.features))
        elif req is Req.GET_PROTOCOL_FEATURES:
            self._reply(conn, req, u64.pack(self.protocol_features))
        elif req is Req.SET_PROTOCOL_FEATURES:
            self.acked_protocol_features = u64.unpack(payload)[0]
        elif req is Req.GET_QUEUE_NUM:
            self._reply(conn, req, u64.pack(1))
        elif req is Req.GET_MAX_MEM_SLOTS:
            self._reply(conn, req, u64.pack(self.max_mem_slots))
        elif req is Req.GET_CONFIG:
            self._reply(conn, req, payload)
        ok = True
        if req is Req.ADD_MEM_REG:
            ok = len(self.table) < self.max_mem_slots
            if ok:
                self.table.append(struct.unpack_from("<QQQ", payload, 8))
        elif req is Req.REM_MEM_REG:
            key = struct.unpack_from("<QQQ", payload, 8)
            ok = key in self.table
            self.table[:] = [k for k in self.table if k != key]
        elif req is Req.SET_MEM_TABLE:
            n = struct.unpack_from("<I", payload)[0]
            self.table[:] = [struct.unpack_from("<QQQ", payload, 8 + 32 * i) for i in range(n)]
        if flags & 0x8 and req not in _ALWAYS_REPLIED:
            self._reply(conn, req, u64.pack(1 if req in self.nack else 0))
        return ok

    def hang_up(self) -> None:
        """Drop the current connection (the back-end lives on)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # shutdown() is what wakes a thread blocked in accept() or recv() on Linux.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.hang_up()
        self._thread.join(5)
        if os.path.exists(self.path):
            os.unlink(self.path)


_ALWAYS_REPLIED = {
    Req.GET_FEATURES,
    Req.GET_PROTOCOL_FEATURES,
    Req.GET_QUEUE_NUM,
    Req.GET_MAX_MEM_SLOTS,
    Req.GET_CONFIG,
}
