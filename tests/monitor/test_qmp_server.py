"""The QMP server: greeting, negotiation, framing, errors, events, sockets, concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import threading
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qmp_support import Client, RawClient, make_machine, next_event, qmp_client, serving, socket_dir

from memslots.monitor.qmp_server import (
    MAX_NESTING,
    ArgType,
    Command,
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


def test_oversized_and_too_deep_input_drop_only_that_client() -> None:
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
                deep = await RawClient.open(path)
                await deep.send(b"[" * (MAX_NESTING + 1))
                reply = await deep.recv()
                assert reply["error"]["desc"] == "JSON nesting depth limit exceeded"
                assert await deep.closed_by_server()
                await deep.close()
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
                await asyncio.sleep(0.1)
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
    async def main() -> None:
        with make_machine() as m:
            async with serving(m, rate=0.3) as (monitor, path), qmp_client(path) as qmp:
                with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as events:
                    for size in range(1, 6):
                        monitor.server.emit_event(
                            "MEMORY_DEVICE_SIZE_CHANGE", {"size": size, "qom-path": "/a"}
                        )
                    monitor.server.emit_event(
                        "MEMORY_DEVICE_SIZE_CHANGE", {"size": 9, "qom-path": "/b"}
                    )
                    got = [await next_event(events, 2) for _ in range(3)]
                    sizes = [(e["data"]["qom-path"], e["data"]["size"]) for e in got]
                    assert sizes == [("/a", 1), ("/b", 9), ("/a", 5)]
                    await asyncio.sleep(0.7)
                    assert events.empty()
                    # After a quiet period the next event goes out at once again.
                    monitor.server.emit_event(
                        "MEMORY_DEVICE_SIZE_CHANGE", {"size": 6, "qom-path": "/a"}
                    )
                    first = await next_event(events, 0.2)
                    assert first["data"]["size"] == 6

    run(main())


def test_commands_run_one_at_a_time() -> None:
    log: list[str] = []

    async def slow(args: dict[str, Any]) -> object:
        log.append(f"start {args['tag']}")
        await asyncio.sleep(0.05)
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
