"""A QMP server on asyncio, as QEMU's monitor speaks it (``docs/interop/qmp-spec``).

The wire protocol: on connect the server sends a greeting; the client must then negotiate with
``qmp_capabilities`` (any other command is answered with ``CommandNotFound``), after which it
may execute commands and receives events. Every message is one JSON object; responses echo the
request's ``id`` (any JSON value); errors are ``{"error": {"class", "desc"}}``; events carry a
``timestamp``. Malformed input gets the error QEMU gives (its class and, except for the JSON
parser's own wording, its text) and the session goes on. Nesting deeper than QEMU's parser
allows (:data:`MAX_NESTING`) gets its error, ``JSON nesting depth limit exceeded``, and the rest
of that message is skipped until its brackets balance (QEMU's current parser recovers so; 8.2
re-read the rest as new input); only a message larger than :data:`MAX_MESSAGE_BYTES` gets an
error and drops the client.

Limits keep the monitor responsive whatever clients do: at most :data:`MAX_CLIENTS` at once,
each of which must complete ``qmp_capabilities`` within :data:`HANDSHAKE_TIMEOUT` seconds; a
client beyond the limit, or accepted while the process is out of file descriptors (a reserve
descriptor makes that possible), gets one error line and is closed. Each kind of refusal is
logged at most once per :data:`LOG_INTERVAL`, with a count of those held back. The listeners
accept connections themselves rather than through ``asyncio.start_server``, whose accept loop
logs a traceback for every attempt while descriptors are exhausted.

Commands live in a table (:class:`Command`) with an argument schema that is checked before the
handler runs, so type, missing and unexpected-argument errors read like QEMU's. Commands run one
at a time, whichever client sent them, so no command sees another's half-done change; those that
read nothing another command changes (``exclusive=False``, e.g. ``query-status``) run at once.

Events are rate-limited like QEMU's monitor: for an event in :data:`RATE_LIMITS`, the first one
for a key (``MEMORY_DEVICE_SIZE_CHANGE``: its ``qom-path``) goes out at once, later ones within
the period are held and only the newest held one is sent when the period ends. Time (event
timestamps, the throttle's periods) comes from a :class:`Clock`: the real one by default, one a
test moves by hand otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import json
import logging
import math
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal, Protocol

from memslots.errors import MemslotsError

log = logging.getLogger("memslots.qmp")

#: A message larger than this (complete or still open) gets an error and drops the client.
MAX_MESSAGE_BYTES = 64 * 1024
#: QEMU's JSON parser refuses deeper nesting (json-streamer's MAX_NESTING).
MAX_NESTING = 1024
#: Clients connected at once; one more is refused.
MAX_CLIENTS = 64
#: Seconds a client has from connecting to completing ``qmp_capabilities``.
HANDSHAKE_TIMEOUT = 30.0
#: Seconds between two log lines about the same kind of refusal.
LOG_INTERVAL = 60.0
#: A client that does not read its events is dropped once this much output waits for it.
MAX_PENDING_OUTPUT = 4 * 1024 * 1024
#: The QEMU release whose QMP behaviour we reproduce (greeting and ``query-version``).
QEMU_VERSION = (8, 2, 0)
#: Seconds between two events of the same key (QEMU's ``monitor_qapi_event_conf``).
RATE_LIMITS: Mapping[str, float] = {"MEMORY_DEVICE_SIZE_CHANGE": 1.0}
#: The ``data`` member that tells instances apart when throttling (QEMU's throttle hash).
THROTTLE_KEYS: Mapping[str, str] = {"MEMORY_DEVICE_SIZE_CHANGE": "qom-path"}
#: Seconds close() lets sessions finish the command they are running before cancelling them.
_CLOSE_GRACE = 1.0
#: Capabilities a client may enable; we offer none (no out-of-band execution).
KNOWN_CAPABILITIES = ("oob",)
#: Seconds before accepting again when the host has no memory for a connection (asyncio's).
_ACCEPT_RETRY = 1.0
_BACKLOG = 100
#: Nesting up to which json.loads runs within any recursion limit our callers leave it.
_JSON_SAFE_DEPTH = 200

ArgType = Literal["str", "int", "uint64", "size", "bool", "number", "object", "array", "any"]
#: A command handler: validated arguments in, a JSON-able result (or an awaitable of one) out.
Handler = Callable[[dict[str, Any]], object]

_INT64 = (-(1 << 63), 1 << 63)
_UINT64_END = 1 << 64
_TYPE_NAMES = {
    "str": "string",
    "int": "integer",
    "bool": "boolean",
    "number": "number",
    "object": "object",
    "array": "array",
}


class QMPCommandError(MemslotsError):
    """A QMP error response: ``error_class`` is QMP's class, the message is its ``desc``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class QMPServerError(MemslotsError):
    """The server could not listen (address in use, path not a socket, bind failed)."""


# -- argument schemas ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One command argument: its name, QAPI type, whether it may be left out.

    ``items`` is the element type of an ``array``. ``uint64`` and ``size`` take JSON integers in
    ``[-2^63, 2^64)``; negative ones wrap, as QEMU accepts them for backward compatibility.
    """

    name: str
    type: ArgType
    optional: bool = False
    items: ArgType | None = None


@dataclass(frozen=True)
class Command:
    """A command of the table: handler and argument schema.

    ``open_args`` accepts arguments beyond ``params`` and passes them on unchecked (QEMU's
    ``'gen': false`` commands such as ``device_add``). ``discriminator`` names a ``str``
    parameter whose value selects more parameters from ``branches`` (a QAPI flat union, as
    ``object-add``'s ``qom-type``).
    """

    name: str
    handler: Handler
    params: tuple[Param, ...] = ()
    open_args: bool = False
    discriminator: str | None = None
    branches: Mapping[str, tuple[Param, ...]] = field(default_factory=dict)
    #: False: the command runs at once, not after the commands before it are done (they may
    #: wait a while for the machine; ``query-status`` must not).
    exclusive: bool = True


def check_value(name: str, type_: ArgType, value: object, items: ArgType | None = None) -> Any:
    """Check one value against a QAPI type; returns it (uint64: wrapped into range).

    Raises :class:`QMPCommandError` with QEMU's input-visitor messages.
    """
    ok: bool
    if type_ == "any":
        return value
    if type_ in ("uint64", "size"):
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and _INT64[0] <= value < _UINT64_END
        ):
            return value % _UINT64_END
        raise QMPCommandError(f"Parameter '{name}' expects uint64")
    if type_ == "int":
        ok = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and _INT64[0] <= value < _INT64[1]
        )
    elif type_ == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif type_ == "str":
        ok = isinstance(value, str)
    elif type_ == "bool":
        ok = isinstance(value, bool)
    elif type_ == "object":
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, list)
    if not ok:
        raise QMPCommandError(
            f"Invalid parameter type for '{name}', expected: {_TYPE_NAMES[type_]}"
        )
    if type_ == "array" and items is not None:
        assert isinstance(value, list)
        return [check_value(f"{name}[{i}]", items, v) for i, v in enumerate(value)]
    return value


def check_arguments(command: Command, args: Mapping[str, object]) -> dict[str, Any]:
    """Validate ``args`` against the command's schema, in schema order like QEMU's visitor.

    Missing arguments are reported before unexpected ones; the result holds the checked values
    (plus, for ``open_args`` commands, the unchecked rest).
    """
    out: dict[str, Any] = {}

    def visit(params: tuple[Param, ...]) -> None:
        for p in params:
            if p.name not in args:
                if not p.optional:
                    raise QMPCommandError(f"Parameter '{p.name}' is missing")
                continue
            out[p.name] = check_value(p.name, p.type, args[p.name], p.items)

    visit(command.params)
    known = [p.name for p in command.params]
    if command.discriminator is not None:
        tag = out[command.discriminator]
        branch = command.branches.get(tag)
        if branch is None:
            raise QMPCommandError(
                f"Parameter '{command.discriminator}' does not accept value '{tag}'"
            )
        visit(branch)
        known += [p.name for p in branch]
    for key, value in args.items():
        if key not in known:
            if not command.open_args:
                raise QMPCommandError(f"Parameter '{key}' is unexpected")
            out[key] = value
    return out


# -- framing -------------------------------------------------------------------------------------


class _FramingError(Exception):
    """The input can never become a message: the client is told and dropped."""


@dataclass(frozen=True)
class _Text:
    """One top-level JSON text, and how deep it nests; or, with ``error``, input that is
    answered with that error instead of being parsed."""

    raw: bytes
    depth: int = 0
    error: str | None = None


class _JsonSplitter:
    """Cuts a byte stream into top-level JSON texts the way QEMU's JSON streamer does.

    It tracks brace and bracket nesting outside strings; a text ends when the nesting returns
    to zero (or, for a bare scalar, at the next delimiter). Whether the text is valid JSON is
    decided later, so a malformed message costs an error response, not the session. A text
    nested deeper than :data:`MAX_NESTING` becomes an error, and the rest of it is skipped
    until its nesting returns to zero. Nothing here recurses, however deep the input.
    """

    _OPEN = frozenset(b"{[")
    _CLOSE = frozenset(b"}]")
    _SPACE = frozenset(b" \t\r\n")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.pos = 0
        self.start = -1  # start of the text being scanned, -1 between texts
        self.depth = 0
        self.max_depth = 0
        self.in_string = False
        self.escape = False
        self.skipping = False  # inside a text that was too deep

    def feed(self, data: bytes) -> list[_Text]:
        """Add input; return the texts it completed. Raises :class:`_FramingError`."""
        self.buf += data
        out: list[_Text] = []
        buf = self.buf
        while self.pos < len(buf):
            c = buf[self.pos]
            if self.start < 0 and not self.skipping:
                if c not in self._SPACE:
                    self.start = self.pos
                    self._begin(c, out)
            elif self.in_string:
                if self.escape:
                    self.escape = False
                elif c == 0x5C:  # backslash
                    self.escape = True
                elif c == 0x22:  # closing quote
                    self.in_string = False
                    if self.depth == 0:
                        self._emit(out, self.pos + 1)
            elif self.depth == 0:
                # A bare scalar (number, keyword, garbage) runs to the next delimiter.
                if c in self._SPACE or c in self._OPEN or c in self._CLOSE or c == 0x22:
                    self._emit(out, self.pos)
                    continue  # rescan the delimiter as the start of the next text
            elif c == 0x22:
                self.in_string = True
            elif c in self._OPEN:
                self.depth += 1
                self.max_depth = max(self.max_depth, self.depth)
                if self.depth > MAX_NESTING and not self.skipping:
                    out.append(_Text(b"", error="JSON nesting depth limit exceeded"))
                    self.skipping = True
                    self.start = -1
            elif c in self._CLOSE:
                self.depth -= 1
                if self.depth == 0:
                    if self.skipping:
                        self.skipping = False
                        self.max_depth = 0
                    else:
                        self._emit(out, self.pos + 1)
            self.pos += 1
            if self.start >= 0 and self.pos - self.start > self.limit:
                raise _FramingError(
                    f"QMP input exceeds the limit of {self.limit} bytes per message"
                )
        if self.start < 0:
            del buf[:]
            self.pos = 0
        elif self.start > 0:
            del buf[: self.start]
            self.pos -= self.start
            self.start = 0
        return out

    def _begin(self, c: int, out: list[_Text]) -> None:
        if c in self._OPEN:
            self.depth = self.max_depth = 1
        elif c == 0x22:
            self.in_string = True
        elif c in self._CLOSE:
            # A stray closer is a message of its own, which will not parse.
            self._emit(out, self.pos + 1)

    def _emit(self, out: list[_Text], end: int) -> None:
        out.append(_Text(bytes(self.buf[self.start : end]), self.max_depth))
        self.start = -1
        self.depth = self.max_depth = 0


# -- the server ----------------------------------------------------------------------------------


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, separators=(", ", ": "), allow_nan=False).encode() + b"\n"


def _reject_constant(name: str) -> object:
    raise ValueError(f"invalid keyword '{name}'")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number '{text}' is out of range")
    return value


@contextlib.contextmanager
def _recursion_headroom(levels: int) -> Iterator[None]:
    """Let the caller recurse ``levels`` more deeply than the recursion limit allows now.

    json.loads recurses once per nesting level, and QEMU's 1024 levels are more than
    Python's default limit of 1000 leaves; the splitter measured the depth without recursing,
    so the limit is raised by just that much around the parse.
    """
    if levels <= _JSON_SAFE_DEPTH:
        yield
        return
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + levels + _JSON_SAFE_DEPTH)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _parse_json(raw: bytes, depth: int) -> object:
    """Parse one message, which nests ``depth`` levels, as QEMU's parser would: no
    NaN/Infinity, no duplicate keys, and no number too large to be echoed back (an overflowing
    ``1e999`` would become infinity)."""
    try:
        text = raw.decode("utf-8")
        with _recursion_headroom(depth):
            return json.loads(
                text,
                parse_constant=_reject_constant,
                parse_float=_finite_float,
                object_pairs_hook=_no_duplicates,
            )
    except (UnicodeDecodeError, ValueError) as exc:
        shown = raw[:80].decode("utf-8", "replace") + ("..." if len(raw) > 80 else "")
        raise QMPCommandError(f"JSON parse error, {exc}: {shown}") from None


def _package_version() -> str:
    try:
        return metadata.version("memslots")
    except metadata.PackageNotFoundError:
        return "unknown"


class Cancellable(Protocol):
    """A timer that can be called off."""

    def cancel(self) -> None:
        """The callback will not run."""
        ...


class Clock(Protocol):
    """The server's time: event timestamps and the event throttle's periods."""

    def time(self) -> float:
        """Seconds since the epoch, for event timestamps (called from any thread)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds, for the handshake timeout and the log throttle."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` in the server's loop ``delay`` seconds from now."""
        ...


class LoopClock:
    """The real clock: wall-clock timestamps, timers on the running event loop."""

    def time(self) -> float:
        """``time.time()``."""
        return time.time()

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """``loop.call_later`` on the running loop."""
        return asyncio.get_running_loop().call_later(delay, callback)


@dataclass
class _Throttle:
    timer: Cancellable
    pending: dict[str, Any] | None = None


class _Throttled:
    """Warnings of which each kind is logged at most once per ``interval`` seconds (of
    ``clock``); the next one logged says how many were held back meanwhile."""

    def __init__(self, clock: Callable[[], float], interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object, exc_info: bool = False) -> None:
        """Log ``msg % args`` unless a warning of this ``kind`` was logged within the interval."""
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        held = self._held.pop(kind, 0)
        if held:
            msg += " (and %d more like it since the last report)"
            args = (*args, held)
        log.warning(msg, *args, exc_info=exc_info)
        self._last[kind] = now


class _Client:
    """One connection: its stream, negotiation state, name for logs and when it came."""

    def __init__(self, writer: asyncio.StreamWriter, name: str, connected_at: float) -> None:
        self.writer = writer
        self.name = name
        self.connected_at = connected_at
        self.negotiated = False

    @property
    def alive(self) -> bool:
        return not self.writer.is_closing()

    def send(self, data: bytes) -> None:
        if not self.alive:
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() + len(data) > MAX_PENDING_OUTPUT:
            log.warning("qmp: dropping %s: it does not read its output", self.name)
            transport.abort()
            return
        self.writer.write(data)

    def close(self) -> None:
        if self.alive:
            self.writer.close()


class QMPServer:
    """A QMP server: Unix and TCP listeners, a command table, events for every client.

    Build it, register commands, then ``await start_unix(path)`` (and/or ``start_tcp``) inside
    the event loop that will run it; ``await close()`` stops everything. :meth:`emit_event`
    may be called from any thread. ``clock`` (a :class:`Clock`) stamps events and times the
    event throttle, the handshake timeout and the log rate limit; tests pass their own (and
    call :meth:`expire_handshakes`).
    """

    def __init__(
        self,
        *,
        version: tuple[int, int, int] = QEMU_VERSION,
        package: str | None = None,
        rate_limits: Mapping[str, float] | None = None,
        max_message: int = MAX_MESSAGE_BYTES,
        max_clients: int = MAX_CLIENTS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        self.version = version
        self.package = package if package is not None else f"memslots {_package_version()}"
        self.rate_limits = dict(RATE_LIMITS if rate_limits is None else rate_limits)
        self.max_message = max_message
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.clock: Clock = clock if clock is not None else LoopClock()
        self.commands: dict[str, Command] = {}
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[tuple[socket.socket, asyncio.Task[None]]] = []
        self._reserve_fd: int | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._throttled = _Throttled(self.clock.monotonic, LOG_INTERVAL)
        self._unix_paths: list[str] = []
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._throttle: dict[tuple[str, str], _Throttle] = {}
        self._serial = 0
        #: Events emitted and not yet taken by the loop (see emit_event).
        self._incoming: list[dict[str, Any]] = []
        self._incoming_lock = threading.Lock()
        self.register(
            Command(
                "qmp_capabilities",
                _accept_capabilities,
                (Param("enable", "array", optional=True, items="str"),),
                exclusive=False,
            )
        )

    # -- configuration ---------------------------------------------------------------------------

    def register(self, command: Command) -> None:
        """Add a command to the table (replacing one of the same name)."""
        self.commands[command.name] = command

    def command_names(self) -> list[str]:
        """Every command in the table, ``qmp_capabilities`` included."""
        return sorted(self.commands)

    @property
    def greeting(self) -> dict[str, Any]:
        """The greeting sent to every new client."""
        major, minor, micro = self.version
        return {
            "QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": self.package,
                },
                "capabilities": [],
            }
        }

    @property
    def client_count(self) -> int:
        """Connected clients (negotiated or not)."""
        return len(self._clients)

    # -- listening -------------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise QMPServerError("the QMP server already runs in another event loop")
        self._loop = loop

    async def start_unix(self, path: str) -> None:
        """Listen on a Unix socket at ``path``, which only our user may connect to (0600).

        A stale socket at ``path`` (no one listening) is replaced; a live one or a file that is
        not a socket is an error.
        """
        self._bind_loop()
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.bind(path)
            bound = True
            # The mode must be narrowed before listen(): until then no one can connect, so there
            # is no moment when another user could.
            os.chmod(path, 0o600)
            self._listen(sock)
        except OSError as exc:
            sock.close()
            if bound:  # never remove a path some other process bound meanwhile
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise QMPServerError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        self._unix_paths.append(path)
        log.info("qmp: listening on %s", path)

    async def start_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on TCP ``host:port``; returns the bound address (``port`` 0 picks one).

        As QEMU, the first of the host's addresses that can be bound is used. TCP has no
        access control: listen there only when the user asked for it.
        """
        self._bind_loop()
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise QMPServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        error: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                self._listen(sock)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            bound = sock.getsockname()
            log.info("qmp: listening on %s:%d", bound[0], bound[1])
            return str(bound[0]), int(bound[1])
        reason = (error.strerror or str(error)) if error is not None else "no address"
        raise QMPServerError(f"cannot listen on {host}:{port}: {reason}")

    def _listen(self, sock: socket.socket) -> None:
        sock.listen(_BACKLOG)
        sock.setblocking(False)
        if self._reserve_fd is None:
            self._reserve_fd = _open_reserve()
        task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        self._listeners.append((sock, task))

    async def close(self) -> None:
        """Stop listening, disconnect every client, drop held events, remove socket files."""
        for _, task in self._listeners:
            task.cancel()
        for sock, task in self._listeners:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            sock.close()
        self._listeners.clear()
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for client in list(self._clients):
            client.close()  # its session then reads EOF and ends
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=_CLOSE_GRACE)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck)
        for state in self._throttle.values():
            state.timer.cancel()
        self._throttle.clear()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths.clear()

    # -- accepting -------------------------------------------------------------------------------

    async def _accept_loop(self, sock: socket.socket) -> None:
        """Accept connections until cancelled; refuse those over the limits, never spin.

        accept() is called only once the socket is readable: at the descriptor limit it fails
        with EMFILE whether or not a connection waits, so calling it blindly would spin.
        """
        loop = asyncio.get_running_loop()
        while True:
            await _readable(loop, sock)
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                # The connection stays in the backlog and the socket readable: take it with the
                # reserve descriptor and refuse it, or wait before trying again.
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._refuse_with_reserve(
                    sock, exc
                ):
                    continue
                self._throttled.warning(
                    "accept",
                    "qmp: cannot accept connections: %s; trying again in %g s",
                    exc,
                    _ACCEPT_RETRY,
                )
                await asyncio.sleep(_ACCEPT_RETRY)
                continue
            if len(self._tasks) >= self.max_clients:
                self._refuse(conn, "limit", f"too many clients (the limit is {self.max_clients})")
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve_connection(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _refuse_with_reserve(self, sock: socket.socket, exc: OSError) -> bool:
        """Free the reserve descriptor to accept one connection and refuse it; False if that
        did not work (no reserve, or no connection after all)."""
        if self._reserve_fd is None:
            return False
        os.close(self._reserve_fd)
        try:
            conn, _ = sock.accept()
        except OSError:
            return False
        else:
            self._refuse(conn, "descriptors", f"the process is out of file descriptors ({exc})")
            return True
        finally:
            # Taken back at once so that the next exhaustion finds it too (None if we lost it).
            self._reserve_fd = _open_reserve()

    def _refuse(self, conn: socket.socket, kind: str, reason: str) -> None:
        """Tell a connection we do not serve why, close it, and log that (rate-limited)."""
        error = _error_response(QMPCommandError(f"QMP connection refused: {reason}"))
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(_json_bytes(error))
        conn.close()
        self._throttled.warning(kind, "qmp: refused a connection: %s", reason)

    # -- sessions --------------------------------------------------------------------------------

    async def _serve_connection(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError as exc:
            conn.close()
            self._throttled.warning("setup", "qmp: cannot set up a connection: %s", exc)
            return
        await self._on_connect(reader, writer)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._serial += 1
        client = _Client(writer, f"client#{self._serial}", self.clock.monotonic())
        self._clients.add(client)
        self._arm_watchdog()
        try:
            await self._session(client, reader)
        except ConnectionError:
            pass  # the client left; nothing to tell it
        except asyncio.CancelledError:
            pass  # only close() cancels sessions
        except Exception:
            # A bug of ours: that client goes, the server stays, and the log is not flooded.
            self._throttled.warning("session", "qmp: %s failed", client.name, exc_info=True)
        finally:
            self._clients.discard(client)
            client.close()
            log.debug("qmp: %s disconnected", client.name)

    def _arm_watchdog(self) -> None:
        if self._watchdog is None and self._loop is not None:
            delay = min(self.handshake_timeout, 1.0)
            self._watchdog = self._loop.call_later(delay, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        self.expire_handshakes()
        if any(not c.negotiated for c in self._clients):
            self._arm_watchdog()

    def expire_handshakes(self) -> int:
        """Drop the clients that did not complete ``qmp_capabilities`` within
        :attr:`handshake_timeout` seconds of :attr:`clock`; returns how many."""
        now = self.clock.monotonic()
        late = [
            c
            for c in self._clients
            if not c.negotiated and now - c.connected_at >= self.handshake_timeout
        ]
        for client in late:
            error = QMPCommandError(
                "capabilities negotiation did not complete within "
                f"{self.handshake_timeout:g} s: closing the connection"
            )
            client.send(_json_bytes(_error_response(error)))
            client.close()
        if late:
            self._throttled.warning(
                "handshake",
                "qmp: dropped %d client(s) that did not negotiate within %g s",
                len(late),
                self.handshake_timeout,
            )
        return len(late)

    async def _session(self, client: _Client, reader: asyncio.StreamReader) -> None:
        client.send(_json_bytes(self.greeting))
        splitter = _JsonSplitter(self.max_message)
        while client.alive:
            data = await reader.read(65536)
            if not data:
                return
            try:
                texts = splitter.feed(data)
            except _FramingError as exc:
                # What came before the oversized text is still answered, then the client goes.
                client.send(_json_bytes(_error_response(QMPCommandError(str(exc)))))
                log.warning("qmp: dropping %s: %s", client.name, exc)
                await _drain(client)
                return
            for text in texts:
                if text.error is not None:
                    response = _error_response(QMPCommandError(text.error))
                else:
                    response = await self._handle_message(client, text)
                # The reply echoes the request's id, which may nest as deeply as the request.
                with _recursion_headroom(text.depth + 1):
                    client.send(_json_bytes(response))
                if not await _drain(client):
                    return

    async def _handle_message(self, client: _Client, text: _Text) -> dict[str, Any]:
        """Answer one complete message of ``client`` (parse, check, dispatch, execute)."""
        request: object = None
        try:
            request = _parse_json(text.raw, text.depth)
            name, args = _check_request(request)
            if not client.negotiated and name != "qmp_capabilities":
                raise QMPCommandError(
                    "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
                )
            command = self.commands.get(name)
            if command is None:
                raise QMPCommandError(f"The command {name} has not been found", "CommandNotFound")
            result = await self._execute(command, args)
            if name == "qmp_capabilities":
                # Its handler checked the arguments (QEMU's order); the mode is the session's.
                if client.negotiated:
                    raise QMPCommandError(
                        "Capabilities negotiation is already complete, command ignored",
                        "CommandNotFound",
                    )
                client.negotiated = True
            response: dict[str, Any] = {"return": result}
        except QMPCommandError as exc:
            response = _error_response(exc)
        if isinstance(request, dict) and "id" in request:
            response["id"] = request["id"]
        return response

    async def _execute(self, command: Command, args: dict[str, Any]) -> object:
        checked = check_arguments(command, args)
        if not command.exclusive:
            return await self._call(command, checked)
        async with self._lock:
            return await self._call(command, checked)

    async def _call(self, command: Command, args: dict[str, Any]) -> object:
        try:
            result = command.handler(args)
            if inspect.isawaitable(result):
                result = await result
            # Serialise here so a result that is not JSON is this command's error.
            json.dumps(result, allow_nan=False)
        except QMPCommandError:
            raise
        except MemslotsError as exc:
            raise QMPCommandError(str(exc)) from exc
        except Exception as exc:
            # With a traceback, but once per command and interval: a failing host (out of
            # descriptors, say) must not flood the log.
            self._throttled.warning(
                f"command {command.name}",
                "qmp: command %s failed",
                command.name,
                exc_info=True,
            )
            raise QMPCommandError(f"internal error in {command.name}: {exc}") from exc
        return result

    # -- events ----------------------------------------------------------------------------------

    def emit_event(self, name: str, data: Mapping[str, Any]) -> None:
        """Send an event to every negotiated client; callable from any thread.

        Delivery goes through the loop, so an event raised while a command runs reaches the
        clients after that command's response (QEMU sends its reply first too).
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # not listening yet: no client can be told
        now = self.clock.time()
        event = {
            "event": name,
            "data": dict(data),
            "timestamp": {"seconds": int(now), "microseconds": int(now * 1e6) % 1_000_000},
        }
        # One wake-up of the loop for any number of events: each call_soon_threadsafe writes a
        # byte into the loop's self-pipe, and a pipe filled by thousands of size changes would
        # lose the byte that tells the loop of a signal (SIGTERM).
        with self._incoming_lock:
            self._incoming.append(event)
            if len(self._incoming) > 1:
                return  # the loop has not taken the earlier ones yet: it will take this too
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._take_incoming)

    def _take_incoming(self) -> None:
        with self._incoming_lock:
            events, self._incoming = self._incoming, []
        for event in events:
            self._queue_event(event)

    def _queue_event(self, event: dict[str, Any]) -> None:
        name = event["event"]
        rate = self.rate_limits.get(name)
        if not rate:
            self._broadcast(event)
            return
        key = (name, str(event["data"].get(THROTTLE_KEYS.get(name, ""), "")))
        state = self._throttle.get(key)
        if state is not None:
            state.pending = event  # only the newest held event survives the period
            return
        self._broadcast(event)
        self._throttle[key] = _Throttle(
            self.clock.call_later(rate, lambda: self._throttle_expired(key))
        )

    def _throttle_expired(self, key: tuple[str, str]) -> None:
        state = self._throttle[key]
        if state.pending is None:
            del self._throttle[key]
            return
        self._broadcast(state.pending)
        state.pending = None
        state.timer = self.clock.call_later(
            self.rate_limits[key[0]], lambda: self._throttle_expired(key)
        )

    def _broadcast(self, event: dict[str, Any]) -> None:
        data = _json_bytes(event)
        for client in list(self._clients):
            if client.negotiated:
                client.send(data)


def _accept_capabilities(args: dict[str, Any]) -> object:
    """``qmp_capabilities``: we offer no capability, so enabling any is refused."""
    enable: list[str] = args.get("enable", [])
    for i, cap in enumerate(enable):
        if cap not in KNOWN_CAPABILITIES:
            raise QMPCommandError(f"Parameter 'enable[{i}]' does not accept value '{cap}'")
    if enable:
        raise QMPCommandError(f"Capability '{enable[0]}' not available")
    return {}


def _check_request(request: object) -> tuple[str, dict[str, Any]]:
    """QEMU's ``qmp_dispatch_check_obj``: the members a request may have, in input order."""
    if not isinstance(request, dict):
        raise QMPCommandError("QMP input must be a JSON object")
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QMPCommandError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPCommandError("QMP input member 'arguments' must be an object")
        elif key != "id":
            # exec-oob lands here too: out-of-band execution is never offered.
            raise QMPCommandError(f"QMP input member '{key}' is unexpected")
    if "execute" not in request:
        raise QMPCommandError("QMP input lacks member 'execute'")
    return request["execute"], request.get("arguments", {})


def _error_response(exc: QMPCommandError) -> dict[str, Any]:
    return {"error": {"class": exc.error_class, "desc": exc.desc}}


async def _drain(client: _Client) -> bool:
    """Wait until the client took its output; False once it is gone."""
    try:
        await client.writer.drain()
    except (ConnectionError, RuntimeError):
        return False
    return client.alive


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` is readable (a listening socket: a connection waits)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _open_reserve() -> int | None:
    """A spare descriptor, closed to make room for accepting when the process has none left."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise QMPServerError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise QMPServerError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody listens there any more
    else:
        raise QMPServerError(f"cannot listen on {path}: another server is listening there")
    finally:
        probe.close()
