"""The QMP server: greeting, negotiation, framing, errors, events, sockets, concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
import threading
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qmp_support import (
    Client,
    ManualClock,
    RawClient,
    make_machine,
    qmp_client,
    queued_event,
    sent_so_far,
    serving,
    socket_dir,
    until,
)

from memslots.monitor.qmp_server import (
    LOG_INTERVAL,
    MAX_NESTING,
    ArgType,
    Command,
    LoopClock,
    Param,
    QMPCommandError,
    QMPServer,
    QMPServerError,
    check_arguments,
    check_value,
)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


# -- argument schemas ----------------------------------------------------------------------------


def _noop(args: dict[str, Any]) -> object:
    return args


CMD = Command(
    "x-test",
    _noop,
    (Param("name", "str"), Param("count", "int", True), Param("size", "size", True)),
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "Parameter 'name' is missing"),
        ({"name": 1}, "Invalid parameter type for 'name', expected: string"),
        ({"name": "a", "count": "1"}, "Invalid parameter type for 'count', expected: integer"),
        ({"name": "a", "count": True}, "Invalid parameter type for 'count', expected: integer"),
        ({"name": "a", "count": 1.0}, "Invalid parameter type for 'count', expected: integer"),
        ({"name": "a", "count": 1 << 63}, "Invalid parameter type for 'count', expected: integer"),
        ({"name": "a", "size": "1G"}, "Parameter 'size' expects uint64"),
        ({"name": "a", "size": 1 << 64}, "Parameter 'size' expects uint64"),
        ({"name": "a", "size": -(1 << 63) - 1}, "Parameter 'size' expects uint64"),
        ({"name": "a", "other": 1}, "Parameter 'other' is unexpected"),
        # QEMU's visitor reports a missing member before an unexpected one.
        ({"other": 1}, "Parameter 'name' is missing"),
    ],
)
def test_schema_errors_read_like_qemu(args: dict[str, Any], message: str) -> None:
    with pytest.raises(QMPCommandError) as info:
        check_arguments(CMD, args)
    assert info.value.desc == message and info.value.error_class == "GenericError"


def test_schema_values() -> None:
    assert check_arguments(CMD, {"name": "a"}) == {"name": "a"}
    # Negative uint64 values wrap, as QEMU accepts them for backward compatibility.
    assert check_arguments(CMD, {"name": "a", "size": -1})["size"] == (1 << 64) - 1
    assert check_value("x", "array", ["a", "b"], "str") == ["a", "b"]
    with pytest.raises(QMPCommandError, match=r"'x\[1\]', expected: string"):
        check_value("x", "array", ["a", 2], "str")
    cases: list[tuple[ArgType, object, str]] = [
        ("bool", 1, "boolean"),
        ("number", "1", "number"),
        ("object", [], "object"),
        ("array", {}, "array"),
    ]
    for type_, value, name in cases:
        with pytest.raises(QMPCommandError, match=f"expected: {name}$"):
            check_value("x", type_, value)
    assert check_value("x", "any", {"a": [1]}) == {"a": [1]}


def test_union_and_open_arguments() -> None:
    union = Command(
        "x-union",
        _noop,
        (Param("kind", "str"),),
        discriminator="kind",
        branches={"a": (Param("x", "int"),), "b": ()},
    )
    assert check_arguments(union, {"kind": "a", "x": 1}) == {"kind": "a", "x": 1}
    cases: list[tuple[dict[str, object], str]] = [
        ({"kind": "c"}, "Parameter 'kind' does not accept value 'c'"),
        ({"kind": "a"}, "Parameter 'x' is missing"),
        ({"kind": "b", "x": 1}, "Parameter 'x' is unexpected"),
    ]
    for args, message in cases:
        with pytest.raises(QMPCommandError, match=message):
            check_arguments(union, args)
    loose = Command("x-open", _noop, (Param("driver", "str"),), open_args=True)
    assert check_arguments(loose, {"driver": "d", "any": [1]}) == {"driver": "d", "any": [1]}


# -- sessions over a raw socket ------------------------------------------------------------------


def test_greeting_negotiation_and_ids() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path):
                c = await RawClient.open(path, negotiate=False)
                version = c.greeting["QMP"]["version"]
                assert set(c.greeting) == {"QMP"} and c.greeting["QMP"]["capabilities"] == []
                assert version["qemu"] == {"micro": 0, "minor": 2, "major": 8}
                assert version["package"].startswith("memslots ")
                expecting = {
                    "class": "CommandNotFound",
                    "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
                }
                for name in ("query-status", "no-such-command"):
                    reply = await c.execute({"execute": name, "id": 7})
                    assert reply == {"error": expecting, "id": 7}
                # Malformed input is a GenericError whether negotiated or not.
                reply = await c.execute({"execute": 1})
                assert reply["error"]["class"] == "GenericError"
                reply = await c.execute({"execute": "qmp_capabilities", "id": "neg"})
                assert reply == {"return": {}, "id": "neg"}
                reply = await c.execute({"execute": "qmp_capabilities"})
                assert reply == {
                    "error": {
                        "class": "CommandNotFound",
                        "desc": "Capabilities negotiation is already complete, command ignored",
                    }
                }
                for ident in [0, "x", None, [1, {"a": 2}], {"k": "v"}, 1.5, True]:
                    reply = await c.execute({"execute": "query-status", "id": ident})
                    assert reply["id"] == ident and reply["return"]["status"] == "running"
                await c.close()

    run(main())


def test_capabilities_arguments() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path):
                c = await RawClient.open(path, negotiate=False)
                cases = [
                    ({"enable": ["oob"]}, "Capability 'oob' not available"),
                    ({"enable": ["x"]}, "Parameter 'enable[0]' does not accept value 'x'"),
                    ({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
                    ({"other": 1}, "Parameter 'other' is unexpected"),
                ]
                for args, desc in cases:
                    reply = await c.execute({"execute": "qmp_capabilities", "arguments": args})
                    assert reply == {"error": {"class": "GenericError", "desc": desc}}
                # Still not negotiated after the failures.
                reply = await c.execute({"execute": "query-status"})
                assert reply["error"]["class"] == "CommandNotFound"
                reply = await c.execute({"execute": "qmp_capabilities", "arguments": {}})
                assert reply == {"return": {}}
                await c.close()

    run(main())


def test_framing_split_and_batched_messages() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path):
                c = await RawClient.open(path)
                # Two messages in one write, one split over three writes, pretty-printed JSON.
                await c.send(b'{"execute": "query-status", "id": 1}{"execute": "query-status",')
                assert (await c.recv())["id"] == 1
                await c.send(b' "id": "a}\\"{"}\n  ')
                assert (await c.recv())["id"] == 'a}"{'
                await c.send(b'{\n  "execute": "query-memory-size-summary",\n  "id": [2]\n}\r\n')
                reply = await c.recv()
                assert reply["id"] == [2] and reply["return"]["base-memory"] == 4 << 30
                await c.close()

    run(main())


def test_oversized_input_drops_only_that_client() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path):
                other = await RawClient.open(path)
                big = await RawClient.open(path)
                await big.send(b'{"execute": "query-status", "id": "' + b"x" * (70 * 1024))
                reply = await big.recv()
                assert reply["error"]["class"] == "GenericError"
                assert "exceeds the limit of 65536 bytes" in reply["error"]["desc"]
                assert await big.closed_by_server()
                await big.close()
                # A complete message larger than the limit is refused the same way.
                huge = await RawClient.open(path)
                pad = "y" * (65 * 1024)
                await huge.send(json.dumps({"execute": "query-status", "id": pad}).encode())
                assert "exceeds" in (await huge.recv())["error"]["desc"]
                assert await huge.closed_by_server()
                await huge.close()
                assert (await other.execute({"execute": "query-status"}))["return"]["running"]
                await other.close()

    run(main())


def _nested(depth: int) -> bytes:
    """A request whose ``id`` makes it nest ``depth`` levels (the object is the first)."""
    return b'{"execute": "query-status", "id": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


async def _recv_deep(c: RawClient) -> dict[str, Any]:
    """The next reply, parsed with room for the deep ``id`` it echoes."""
    line = await asyncio.wait_for(c.reader.readline(), 10)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 2 * MAX_NESTING)
    try:
        reply: dict[str, Any] = json.loads(line)
    finally:
        sys.setrecursionlimit(limit)
    return reply


def test_json_nested_up_to_qemus_limit_is_parsed() -> None:
    """QEMU parses up to 1024 levels; Python's json recursed past its limit from about 990
    and the RecursionError dropped the client."""

    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path):
                c = await RawClient.open(path)
                for depth in (990, 1000, 1023, MAX_NESTING):
                    await c.send(_nested(depth) + b"\n")
                    reply = await _recv_deep(c)
                    assert reply["return"]["running"] is True, depth
                    ident, levels = reply["id"], 1
                    while ident:
                        ident, levels = ident[0], levels + 1
                    assert levels == depth - 1
                await c.close()

    run(main())


def test_json_nested_too_deep_is_an_error_and_the_session_goes_on() -> None:
    """Beyond 1024 levels: QEMU's "JSON nesting depth limit exceeded", once per message (the
    rest of it is skipped until its brackets balance), and the connection stays usable."""

    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path):
                c = await RawClient.open(path)
                for payload in (
                    b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1),
                    _nested(MAX_NESTING + 100),
                    b'{"a": "]]]", "b": ' + b"{" * 2000 + b'"}}}"' + b"}" * 2001,
                ):
                    await c.send(payload + b'\n{"execute": "query-status", "id": "after"}\n')
                    reply = await c.recv()
                    assert reply == {
                        "error": {
                            "class": "GenericError",
                            "desc": "JSON nesting depth limit exceeded",
                        }
                    }
                    reply = await c.recv()
                    assert reply["id"] == "after" and reply["return"]["running"] is True
                # Sent in pieces, the limit holds across reads.
                for piece in (b"[" * 600, b"[" * 600, b"]" * 1200):
                    await c.send(piece)
                await c.send(b'{"execute": "query-status", "id": 2}')
                assert (await c.recv())["error"]["desc"] == "JSON nesting depth limit exceeded"
                assert (await c.recv())["id"] == 2
                await c.close()

    run(main())


def test_disconnect_mid_command_and_mid_message() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (monitor, path):
                survivor = await RawClient.open(path)
                for payload in (
                    b'{"execute": "x-query-memslots"}\n',  # leaves before reading the reply
                    b'{"execute": "query-status", "argu',  # leaves in the middle of a message
                    b'{"execute": "object-add", "arguments": {"qom-type": "memory-backend-ram",'
                    b' "id": "gone", "size": 1048576}}\n',  # its command still runs to the end
                ):
                    c = await RawClient.open(path)
                    c.writer.write(payload)
                    c.writer.transport.abort()
                await until(lambda: monitor.server.client_count == 1)
                reply = await survivor.execute({"execute": "query-status", "id": "alive"})
                assert reply["id"] == "alive"
                assert "gone" in m.backends  # done whole, not half
                assert monitor.server.client_count == 1
                await survivor.close()

    run(main())


def test_events_go_to_negotiated_clients_only() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (monitor, path):
                waiting = await RawClient.open(path, negotiate=False)
                a = await RawClient.open(path)
                b = await RawClient.open(path)
                monitor.server.emit_event("TEST_EVENT", {"n": 1})
                for c in (a, b):
                    line = json.loads(await asyncio.wait_for(c.reader.readline(), 5))
                    assert line["event"] == "TEST_EVENT" and line["data"] == {"n": 1}
                    assert set(line["timestamp"]) == {"seconds", "microseconds"}
                    assert 0 <= line["timestamp"]["microseconds"] < 1_000_000
                # The unnegotiated client's next line is its own reply, not the event.
                await waiting.send(b'{"execute": "qmp_capabilities", "id": 1}')
                line = await asyncio.wait_for(waiting.reader.readline(), 5)
                assert json.loads(line) == {"return": {}, "id": 1}
                for c in (waiting, a, b):
                    await c.close()

    run(main())


def test_a_flood_of_events_from_another_thread_loses_no_signal() -> None:
    """Every call_soon_threadsafe writes a byte into the loop's self-pipe; events emitted by a
    guest thread while the loop is busy must not fill it, or the byte of a SIGTERM is lost."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, got.set)
        try:
            with socket_dir() as d:
                server = QMPServer()
                await server.start_unix(f"{d}/qmp.sock")
                try:

                    def flood() -> None:
                        for i in range(20_000):
                            server.emit_event("X_TEST", {"i": i})

                    thread = threading.Thread(target=flood)
                    thread.start()
                    thread.join()  # the loop does not run meanwhile
                    os.kill(os.getpid(), signal.SIGUSR1)
                    await asyncio.wait_for(got.wait(), 10)
                finally:
                    await server.close()
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    run(main())


def test_rate_limit_per_key() -> None:
    clock = ManualClock()

    async def main() -> None:
        with make_machine() as m:
            async with (
                serving(m, rate=0.25, clock=clock) as (monitor, path),
                qmp_client(path) as qmp,
            ):
                with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as events:
                    for size in range(1, 6):
                        monitor.server.emit_event(
                            "MEMORY_DEVICE_SIZE_CHANGE", {"size": size, "qom-path": "/a"}
                        )
                    monitor.server.emit_event(
                        "MEMORY_DEVICE_SIZE_CHANGE", {"size": 9, "qom-path": "/b"}
                    )
                    await sent_so_far(qmp)
                    got = [await queued_event(events) for _ in range(2)]
                    assert events.empty()  # /a's sizes 2 to 5 are held
                    clock.advance(0.25)
                    await sent_so_far(qmp)
                    got.append(await queued_event(events))
                    sizes = [(e["data"]["qom-path"], e["data"]["size"]) for e in got]
                    assert sizes == [("/a", 1), ("/b", 9), ("/a", 5)]
                    clock.advance(0.5)  # /a's second period ends with nothing held
                    await sent_so_far(qmp)
                    assert events.empty()
                    # After a quiet period the next event goes out at once again.
                    monitor.server.emit_event(
                        "MEMORY_DEVICE_SIZE_CHANGE", {"size": 6, "qom-path": "/a"}
                    )
                    await sent_so_far(qmp)
                    assert (await queued_event(events))["data"]["size"] == 6

    run(main())


def test_commands_run_one_at_a_time() -> None:
    log: list[str] = []

    async def slow(args: dict[str, Any]) -> object:
        log.append(f"start {args['tag']}")
        for _ in range(5):  # give every other command the chance to start meanwhile
            await asyncio.sleep(0)
        log.append(f"end {args['tag']}")
        return {}

    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (monitor, path):
                monitor.server.register(Command("x-slow", slow, (Param("tag", "str"),)))
                async with qmp_client(path, "a") as a, qmp_client(path, "b") as b:
                    await asyncio.gather(
                        *(
                            c.execute("x-slow", {"tag": f"{n}{i}"})
                            for i in range(3)
                            for n, c in (("a", a), ("b", b))
                        )
                    )
        assert len(log) == 12
        for i in range(0, 12, 2):
            assert log[i].split()[1] == log[i + 1].split()[1]

    run(main())


def test_a_command_that_is_not_exclusive_does_not_wait_for_the_others() -> None:
    """While a command waits (for the machine, say), query-status is answered."""
    release = asyncio.Event()

    async def waiting(args: dict[str, Any]) -> object:
        await release.wait()
        return {}

    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (monitor, path):
                monitor.server.register(Command("x-wait", waiting))
                async with qmp_client(path, "a") as a, qmp_client(path, "b") as b:
                    pending = asyncio.create_task(a.execute("x-wait"))
                    await asyncio.sleep(0.01)
                    assert (await b.execute("query-status"))["status"] == "running"
                    assert not pending.done()  # answered while the other one still waits
                    release.set()
                    assert await pending == {}

    run(main())


def test_internal_errors_are_generic_errors() -> None:
    def broken(args: dict[str, Any]) -> object:
        raise ValueError("boom")

    def not_json(args: dict[str, Any]) -> object:
        return {"x": {1, 2}}

    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (monitor, path):
                monitor.server.register(Command("x-broken", broken))
                monitor.server.register(Command("x-not-json", not_json))
                async with qmp_client(path) as qmp:
                    for name in ("x-broken", "x-not-json"):
                        with pytest.raises(ExecuteError) as info:
                            await qmp.execute(name)
                        assert info.value.error_class == "GenericError"
                        assert f"internal error in {name}" in str(info.value)
                    assert await qmp.execute("query-status")

    run(main())


# -- sockets -------------------------------------------------------------------------------------


def test_unix_socket_mode_and_stale_sockets() -> None:
    async def main() -> None:
        with socket_dir() as d:
            path = f"{d}/s"
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(path)  # bound, never listening: what a crashed server leaves
            stale.close()
            server = QMPServer()
            await server.start_unix(path)
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            with pytest.raises(QMPServerError, match="another server is listening"):
                await QMPServer().start_unix(path)
            await server.close()
            assert not os.path.exists(path)
            with open(f"{d}/file", "w"):
                pass
            with pytest.raises(QMPServerError, match="not a socket"):
                await QMPServer().start_unix(f"{d}/file")
            with pytest.raises(QMPServerError, match="cannot listen"):
                await QMPServer().start_unix(f"{d}/missing/dir/s")

    run(main())


def test_tcp_only_when_asked() -> None:
    async def main() -> None:
        server = QMPServer()
        host, port = await server.start_tcp("127.0.0.1", 0)
        assert host == "127.0.0.1" and port > 0
        qmp = Client("tcp")
        await qmp.connect((host, port))
        with pytest.raises(ExecuteError, match="The command query-status has not been found"):
            await qmp.execute("query-status")
        await qmp.disconnect()
        with pytest.raises(QMPServerError, match="cannot listen"):
            await QMPServer().start_tcp("127.0.0.1", port)
        await server.close()

    run(main())


# -- limits --------------------------------------------------------------------------------------


class FakeClock(LoopClock):
    """Monotonic seconds that move only when the test says so (timers stay the loop's)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


REFUSED = "QMP connection refused: too many clients (the limit is 3)"


def test_connection_limit_refuses_cleanly_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    """Clients beyond the limit get one error line and are closed; the log says so once, not
    once per refusal; a freed place is taken again."""

    async def main() -> None:
        with socket_dir() as d:
            path = f"{d}/s"
            server = QMPServer(max_clients=3, clock=FakeClock())
            await server.start_unix(path)
            try:
                clients = [await RawClient.open(path) for _ in range(3)]
                for _ in range(20):
                    reader, writer = await asyncio.open_unix_connection(path)
                    line = await asyncio.wait_for(reader.readline(), 5)
                    assert json.loads(line) == {"error": {"class": "GenericError", "desc": REFUSED}}
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                    writer.close()
                assert server.client_count == 3
                await clients.pop().close()
                for _ in range(100):  # until the server saw that client go
                    if server.client_count < 3:
                        break
                    await asyncio.sleep(0.01)
                clients.append(await RawClient.open(path))
                for c in clients:
                    await c.close()
            finally:
                await server.close()

    with caplog.at_level("WARNING", logger="memslots.qmp"):
        run(main())
    refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refusals) == 1 and "the limit is 3" in refusals[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)


def test_handshake_timeout_drops_clients_that_never_negotiate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that connects and never sends qmp_capabilities is told and closed once the
    timeout passes (an injected clock); negotiated clients stay."""

    async def main() -> None:
        clock = FakeClock()
        with socket_dir() as d:
            path = f"{d}/s"
            server = QMPServer(handshake_timeout=30, clock=clock)
            await server.start_unix(path)
            try:
                silent = [await RawClient.open(path, negotiate=False) for _ in range(5)]
                talker = await RawClient.open(path)
                clock.now += 29.9
                assert server.expire_handshakes() == 0
                clock.now += 0.1
                assert server.expire_handshakes() == 5
                for c in silent:
                    reply = await c.recv()
                    assert reply["error"]["desc"] == (
                        "capabilities negotiation did not complete within 30 s: "
                        "closing the connection"
                    )
                    assert await c.closed_by_server()
                    await c.close()
                clock.now += 3600
                assert server.expire_handshakes() == 0
                reply = await talker.execute({"execute": "qmp_capabilities"})
                assert reply["error"]["desc"].startswith("Capabilities negotiation is already")
                await talker.close()
            finally:
                await server.close()

    with caplog.at_level("WARNING", logger="memslots.qmp"):
        run(main())
    dropped = [r.getMessage() for r in caplog.records if "did not negotiate" in r.getMessage()]
    assert dropped == ["qmp: dropped 5 client(s) that did not negotiate within 30 s"]


def test_repeated_refusals_are_summarised_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        clock = FakeClock()
        with socket_dir() as d:
            path = f"{d}/s"
            server = QMPServer(max_clients=0, clock=clock)
            await server.start_unix(path)
            try:
                for i in range(7):
                    if i == 5:
                        clock.now += LOG_INTERVAL
                    reader, writer = await asyncio.open_unix_connection(path)
                    assert b"too many clients" in await asyncio.wait_for(reader.readline(), 5)
                    writer.close()
            finally:
                await server.close()

    with caplog.at_level("WARNING", logger="memslots.qmp"):
        run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[1].endswith("(and 4 more like it since the last report)")
