"""Helpers for the QMP tests: a machine on the KVM model, a runtime, servers, a raw client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

from qemu.qmp import EventListener, QMPClient

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.devices.virtio_mem.wire import ReqType, Request, Resp, Response
from memslots.errors import ConfigError
from memslots.guest.sched import Scheduler
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.machine.vm import GuestVm
from memslots.monitor.commands import Monitor
from memslots.monitor.qmp_server import Cancellable, Clock, QMPServer
from memslots.options import parse_machine_config
from memslots.sizes import GiB

MEMORY = "4G,slots=2,maxmem=16G"
OBJECTS = (
    "memory-backend-ram,id=mem0,size=8G,reserve=off",
    "memory-backend-ram,id=mem1,size=1G,reserve=off",
    "memory-backend-ram,id=mem2,size=2G,reserve=off",
)
DEVICES = (
    "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
    "pc-dimm,id=dimm0,memdev=mem1",
)
#: A safety net for waits on something that must happen; no test measures time with it.
WAIT = 5.0


def make_machine() -> Machine:
    """vmem0: 8 GiB as 8 memslots of 1 GiB, 2 MiB blocks; dimm0: 1 GiB; mem2 unused."""
    return Machine(parse_machine_config(MEMORY, OBJECTS, DEVICES, accel="sim"), vm=KvmModel())


class FakeRuntime:
    """The runtime the monitor talks to: a status, a quit counter, resets done on the machine,
    STOP and RESUME sent through ``server`` (once serving), and no guest
    (``x-guest-memory-access`` is refused)."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self.state = "running"
        self.quits = 0
        self.resets = 0
        self.autostart = True
        self.server: QMPServer | None = None

    @property
    def machine(self) -> Machine:
        return self._machine

    def status(self) -> str:
        return self.state

    def quit(self) -> None:
        self.quits += 1

    def stop(self) -> bool:
        was_running, self.state = self.state == "running", "paused"
        if was_running and self.server is not None:
            self.server.emit_event("STOP", {})
        return was_running

    def cont(self) -> None:
        self.state = "running"
        if self.server is not None:
            self.server.emit_event("RESUME", {})

    def system_reset(self) -> None:
        self.resets += 1
        self._machine.system_reset()
        if self.state == "internal-error":
            self.state = "prelaunch"

    def guest_memory_access(self, address: int, *, write: bool, value: int) -> int | None:
        raise ConfigError("the machine runs without a guest (-guest none)")

    @property
    def guest(self) -> GuestVm | None:
        return None


class ManualClock:
    """The QMP server's clock, moved only by the test (:meth:`advance`): the throttle's periods
    end exactly when the test says, however busy the host is."""

    #: Timestamps start here (an arbitrary moment, seconds since the epoch).
    EPOCH = 1_700_000_000.0

    def __init__(self) -> None:
        self._sched = Scheduler()

    def time(self) -> float:
        """The current (manual) time, since the epoch."""
        return self.EPOCH + self._sched.now()

    def monotonic(self) -> float:
        """The current (manual) monotonic time."""
        return self._sched.now()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` once :meth:`advance` passes ``delay`` seconds from now."""
        return self._sched.call_at(self._sched.now() + delay, callback)

    def advance(self, seconds: float) -> None:
        """Move time forward, running every timer that falls due, in order."""
        self._sched.advance(seconds)


async def sent_so_far(qmp: QMPClient) -> None:
    """Wait until the client has everything the server sent before now: a command's reply
    comes after every event the server wrote before it, and the server runs the events it
    queued before it reads the command."""
    await asyncio.wait_for(qmp.execute("query-status"), WAIT)


async def queued_event(listener: EventListener) -> Any:
    """The event ``listener`` already holds (after :func:`sent_so_far`); fails if none."""
    assert not listener.empty(), "no event was sent"
    return await listener.get()


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition()`` holds (``WAIT`` is only a safety net)."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0)


@contextlib.contextmanager
def socket_dir() -> Iterator[str]:
    """A short directory for sockets (pytest's tmp_path can pass the 108-byte limit)."""
    path = tempfile.mkdtemp(prefix="qmp", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(
    machine: Machine,
    *,
    rate: float = 1.0,
    runtime: FakeRuntime | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[tuple[Monitor, str]]:
    """A monitor over ``machine`` listening on a fresh Unix socket in this loop."""
    with socket_dir() as d:
        server = QMPServer(rate_limits={"MEMORY_DEVICE_SIZE_CHANGE": rate}, clock=clock)
        runtime = runtime or FakeRuntime(machine)
        runtime.server = server
        monitor = Monitor(runtime, server)
        path = f"{d}/qmp.sock"
        await server.start_unix(path)
        try:
            yield monitor, path
        finally:
            await server.close()
            monitor.close()


class Client(QMPClient):
    """qemu.qmp's client, whose results (JSON) the tests look into: typed Any, not object."""

    async def execute(
        self, cmd: str, arguments: Mapping[str, object] | None = None, oob: bool = False
    ) -> Any:
        return await super().execute(cmd, arguments, oob)


async def next_event(listener: EventListener, timeout: float) -> Any:
    """The next event of ``listener`` (a JSON object), waiting at most ``timeout`` seconds."""
    return await asyncio.wait_for(listener.get(), timeout)


@contextlib.asynccontextmanager
async def qmp_client(path: str, name: str = "test") -> AsyncIterator[Client]:
    """The real qemu.qmp client, connected and negotiated."""
    qmp = Client(name)
    await asyncio.wait_for(qmp.connect(path), WAIT)
    try:
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()


class RawClient:
    """A byte-level client for input that qemu.qmp would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def open(cls, path: str, *, negotiate: bool = True) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        client.greeting = await client.recv()
        if negotiate:
            assert await client.execute({"execute": "qmp_capabilities"}) == {"return": {}}
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), WAIT)
            assert line, "the server closed the connection"
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    async def execute(self, obj: object) -> dict[str, Any]:
        await self.send(json.dumps(obj).encode() + b"\n")
        return await self.recv()

    async def closed_by_server(self) -> bool:
        """True if the server closes the connection (after any pending output)."""
        try:
            while await asyncio.wait_for(self.reader.readline(), WAIT):
                pass
        except (ConnectionError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def snapshot(machine: Machine) -> object:
    """Everything a failed command must leave as it was."""
    devices = {}
    for dev in machine.memory_devices:
        entry: tuple[object, ...] = (type(dev).__name__, dev.get_addr(), dev.get_plugged_size())
        if isinstance(dev, VirtioMem):
            entry += (dev.requested_size, dev.usable_region_size, tuple(dev.memslot_map()))
        devices[dev.id] = entry
    dm = machine.device_memory
    assert dm is not None
    return (
        devices,
        sorted(machine.backends),
        {b: machine.backends[b].used_by for b in machine.backends},
        [(s.slot, s.section.gpa, s.section.size) for s in machine.kvm.slots()],
        (machine.kvm.used_memslots, machine.kvm.free_memslots),
        (dm.required_memslots, dm.used_memslots, dm.used_region_size, dm.auto_decision_active),
        machine.address_space.sections,
    )


def step_blocks(dev: VirtioMem, max_blocks: int) -> bool:
    """One guest request toward ``requested-size`` of at most ``max_blocks`` blocks.

    Returns False once the device is there. Plugs the lowest unplugged blocks, unplugs the
    highest plugged ones; raises unless the device ACKs.
    """
    if dev.size == dev.requested_size:
        return False
    bs = dev.block_size
    plug = dev.size < dev.requested_size
    want = min(abs(dev.requested_size - dev.size) // bs, max_blocks)
    first = dev.bitmap.find(0) if plug else dev.bitmap.rfind(1) + 1 - want
    kind = ReqType.PLUG if plug else ReqType.UNPLUG
    resp = Response.unpack(dev.handle_request(Request(kind, dev.addr + first * bs, want).pack()))
    assert resp.type == Resp.ACK, resp
    return True


class SteppingGuest:
    """A guest that follows ``requested-size`` in small steps on the server's loop."""

    def __init__(self, dev: VirtioMem, step: int = GiB // 4, interval: float = 0.02) -> None:
        self.dev = dev
        self.blocks = step // dev.block_size
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        dev.config_change_listeners.append(self._config_changed)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _config_changed(self, dev: VirtioMem) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while step_blocks(self.dev, self.blocks):
            await asyncio.sleep(self.interval)


class ServerThread:
    """A monitor serving ``machine`` from its own thread and loop (for the sync CLI functions)."""

    def __init__(self, machine: Machine, path: str, *, guest: bool = False) -> None:
        self.machine = machine
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.monitor: Monitor | None = None
        self.guest: SteppingGuest | None = None
        self._with_guest = guest
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(WAIT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        self.loop.close()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        runtime = FakeRuntime(self.machine)
        runtime.server = QMPServer()
        self.monitor = Monitor(runtime, runtime.server)
        if self._with_guest:
            self.guest = SteppingGuest(self.machine.virtio_mem("vmem0"))
        await self.monitor.server.start_unix(self.path)

    async def _stop(self) -> None:
        assert self.monitor is not None
        if self.guest is not None:
            self.guest.stop()
        await self.monitor.server.close()
        self.monitor.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a function or a coroutine function) in the server's loop."""
        fut: Future[Any] = Future()

        async def run() -> None:
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    result = await result
                fut.set_result(result)
            except BaseException as exc:
                fut.set_exception(exc)

        asyncio.run_coroutine_threadsafe(run(), self.loop)
        return fut.result(WAIT)
