"""The QMP commands of a running machine: QEMU's monitor over a :class:`Machine`.

Commands, arguments, result fields and error texts are QEMU 8.2's (``qemu-behaviour.md`` §6):
``query-status``, ``stop``, ``cont``, ``quit``, ``system_reset``, ``query-memory-devices``,
``query-memory-size-summary``,
``qom-get``/``qom-set`` (virtio-mem, pc-dimm and memory-backend properties),
``object-add``/``object-del`` for memory backends and ``device_add``/``device_del`` for
``virtio-mem`` and ``pc-dimm``. Our extensions follow QEMU's ``x-`` convention:
``x-query-memslots`` (every memslot of every memory device and who maps it),
``x-query-memslot-budget``, ``x-query-kernel-metadata``, ``x-query-virtio-mem-guest`` (where
the guest driver of a virtio-mem device stands, and why it stopped short of the request),
``x-query-guest`` (every guest driver and, with ``verify``, a check from inside the guest of all
the memory they use) and ``x-guest-memory-access`` (the guest's CPU touches a byte, as a guest
that ignores the protocol might).

Events: ``MEMORY_DEVICE_SIZE_CHANGE`` on every change of a virtio-mem device's ``size`` (rate-
limited per ``qom-path`` by the server, as QEMU's monitor does), ``DEVICE_DELETED`` after
``device_del``, ``SHUTDOWN`` on ``quit``, ``RESET`` after ``system_reset``, ``STOP`` and ``RESUME``
(the runtime's) around a pause, and ``X_GUEST_MEMORY_FAULT`` then ``STOP`` when a guest access to
memory out of its reach stopped the VM (runstate ``internal-error``: ``cont`` is refused until a
reset).

QOM paths are QEMU's: a device with an id is ``/machine/peripheral/<id>`` (the virtio-mem-pci
proxy; its virtio device is the child ``virtio-backend``), one without is
``/machine/peripheral-anon/device[N]``, a backend is ``/objects/<id>``. Partial paths (``vmem0``)
resolve when they name exactly one object, as QEMU's ``object_resolve_path`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from memslots.devices.memory_device import MemoryDevice
from memslots.devices.qom import QomObject, QomProperty, refuse
from memslots.errors import GuestMemoryFault, MonitorError
from memslots.host.kmem import KmemMeter, current_or_system_meter
from memslots.machine.machine import Machine
from memslots.machine.runner import MachineRunner
from memslots.machine.vm import GuestFault, GuestVm
from memslots.memory.backends import MemoryBackend
from memslots.monitor.qmp_server import (
    Command,
    Handler,
    Param,
    QMPCommandError,
    QMPServer,
    check_value,
)
from memslots.monitor.runstate import FINISH_MIGRATE, INMIGRATE, NEEDS_RESET, RUNNING
from memslots.options import backend_from_args, device_from_args, id_wellformed
from memslots.reports import (
    budget_report,
    guest_report,
    kernel_metadata_report,
    memslot_report,
    to_qmp,
)
from memslots.vhost.user.consumer import ConnectionState, VhostUserConsumer
from memslots.vhost.user.wire import VhostUserConnection

log = logging.getLogger("memslots.monitor.commands")

PERIPHERAL = "/machine/peripheral/"
ANON = "/machine/peripheral-anon/device[{}]"


class Runtime(Protocol):
    """What the monitor needs from the process that runs the machine (``memslots run``)."""

    @property
    def machine(self) -> Machine:
        """The machine the commands act on."""
        ...

    def status(self) -> str:
        """QEMU's RunState name for ``query-status``: "running", "paused", "shutdown", ..."""
        ...

    def quit(self) -> None:
        """Ask the runtime to stop; called in the server's loop after the reply is queued.

        It must not block: the runtime stops its guests, awaits ``QMPServer.close()`` and
        closes the machine from its own task.
        """
        ...

    def stop(self) -> bool:
        """Pause the VM (STOP): its guest's clock stands still; True if it was running."""
        ...

    def cont(self) -> None:
        """Run the VM (RESUME); the monitor refused it already if it needs a reset."""
        ...

    @property
    def autostart(self) -> bool:
        """Whether a destination runs once loaded (not with ``-S``, nor after ``stop``)."""
        ...

    @autostart.setter
    def autostart(self, value: bool) -> None: ...

    def system_reset(self) -> None:
        """Reset the machine as QEMU's ``system_reset`` does (virtio-mem memory unplugged, the
        guests' drivers and vCPU start over; ``internal-error`` becomes ``prelaunch``)."""
        ...

    def guest_memory_access(self, address: int, *, write: bool, value: int) -> int | None:
        """The guest's CPU reads (or writes) the byte at ``address``: the byte (0 for a
        write), None for MMIO; raises :class:`~memslots.errors.GuestMemoryFault` after
        stopping the VM if the memory is out of the guest's reach."""
        ...

    @property
    def guest(self) -> GuestVm | None:
        """The guest side (None with ``-guest none``)."""
        ...


class DeviceProvider(Protocol):
    """Devices that ``device_add``/``device_del`` hand to someone else (vhost-user devices).

    Refusals are raised as :class:`~memslots.errors.MemslotsError` and reach the client as
    ``GenericError`` with their message. The monitor sends ``DEVICE_DELETED`` after a removal.
    """

    def drivers(self) -> Sequence[str]:
        """The ``driver`` names this provider creates."""
        ...

    def add_device(self, args: dict[str, Any]) -> None:
        """Create a device from ``device_add``'s arguments (``driver``, ``id``, the rest)."""
        ...

    def has_device(self, dev_id: str) -> bool:
        """True if this provider created the device with this id."""
        ...

    def remove_device(self, dev_id: str) -> None:
        """Remove the device (``device_del``)."""
        ...


def _check_id(text: str) -> None:
    if not id_wellformed(text):
        raise QMPCommandError("Parameter 'id' expects an identifier")


def _backend_props(backend: MemoryBackend) -> QomObject:
    qom_type = backend.opts.qom_type
    fixed = refuse("cannot change property value")
    return QomObject(
        qom_type,
        {
            "type": QomProperty(lambda: qom_type),
            # QEMU's text, trailing space included.
            "size": QomProperty(
                lambda: backend.size, refuse(f"cannot change property size of {qom_type} ")
            ),
            "share": QomProperty(lambda: backend.opts.share, fixed),
            "reserve": QomProperty(lambda: backend.opts.reserve, fixed),
            # QEMU would preallocate now; we keep the backend as it was created.
            "prealloc": QomProperty(lambda: backend.opts.prealloc, fixed),
        },
    )


class Monitor:
    """The commands and events of one running machine, registered in a :class:`QMPServer`.

    ``device_added`` and ``device_removed`` are called after a successful ``device_add``
    (with the memory device) and ``device_del`` (with the id), so the runtime can attach or
    detach guest drivers.

    With a ``runner``, every command that reads or changes the machine runs in the runner's
    worker thread holding the machine lock (:meth:`MachineRunner.run`), so the loop stays free
    while it waits for the machine; the others (``query-status``, ``quit``, ...) run on the loop
    at once. Without one, everything runs on the loop.
    """

    def __init__(
        self,
        runtime: Runtime,
        server: QMPServer | None = None,
        *,
        kmem: KmemMeter | None = None,
        runner: MachineRunner | None = None,
    ) -> None:
        self.runtime = runtime
        self.runner = runner
        #: Events of the machine command that runs now; they follow its reply (see _emit).
        self._held_events: list[tuple[str, dict[str, Any]]] | None = None
        #: Where ``x-query-kernel-metadata`` reads kernel memory (default: the process's meter).
        self._kmem = kmem
        self.server = server if server is not None else QMPServer()
        self.device_added: list[Callable[[MemoryDevice], None]] = []
        #: The vhost-user back-ends that have our state listener (the objects themselves: an
        #: id() of a removed one can come back as a new back-end's).
        self._watched_vhost: set[VhostUserConsumer] = set()
        #: Their connections the loop watches for a hang-up: (close listener, end of watch).
        self._watched_connections: dict[
            VhostUserConnection, tuple[Callable[[], None], Callable[[], None]]
        ] = {}
        #: Hang-up checks running in the runner's worker.
        self._checks: set[asyncio.Task[None]] = set()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # a monitor built outside a loop serves no one, watches nothing
            self._loop = None
        self._loop_thread = threading.get_ident()
        self.device_removed: list[Callable[[str], None]] = []
        self._providers: list[DeviceProvider] = []
        self._anon_paths: dict[MemoryDevice, str] = {}
        self._watched: set[MemoryDevice] = set()
        #: True while an outgoing migration runs: device_add and device_del are refused.
        self.migrating: Callable[[], bool] = lambda: False
        for command in self._commands():
            self.server.register(command)
        self.sync_devices()

    @property
    def machine(self) -> Machine:
        """The runtime's machine."""
        return self.runtime.machine

    def add_device_provider(self, provider: DeviceProvider) -> None:
        """Let ``provider`` create and remove the devices of its drivers (vhost-user)."""
        self._providers.append(provider)

    def sync_devices(self) -> None:
        """Watch the size of every memory device; forget removed ones.

        Called for the machine's devices at start and after ``device_add``/``device_del``;
        a runtime that plugs devices by other means calls it too.
        """
        present = self.machine.memory_devices
        for dev in present:
            if dev not in self._watched:
                dev.size_change_listeners.append(self._size_changed)
                self._watched.add(dev)
                self.qom_path(dev)  # an anonymous device is named when it comes, as in QEMU
        for dev in [d for d in self._watched if d not in present]:
            self._unwatch(dev)
        backends = {vdev.consumer for vdev in self.machine.vhost_user_devices}
        for backend in backends - self._watched_vhost:
            backend.state_listeners.append(self._vhost_state_changed)
            self._watched_vhost.add(backend)
            self._watch_connection(backend)
        for backend in self._watched_vhost - backends:
            self._unwatch_vhost(backend)

    def _watch_connection(self, backend: VhostUserConsumer) -> None:
        """Have the loop tell us when a connected back-end's socket turns readable.

        A back-end sends nothing unasked on it, so that is its hang-up, which QEMU learns from
        the chardev at once; one round trip (:meth:`VhostUserConsumer.check`, holding the
        machine lock) then finds it gone and the loss is an event without waiting for the next
        memory-table change. Callable from any thread. The loop watches a duplicate of the
        connection's descriptor: whichever thread closes the connection, the watch ends on the
        loop afterwards, and no other socket can get that descriptor number meanwhile.
        """
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._watch_connection, backend)
            return
        frontend = backend.frontend
        if frontend is None or not backend.connected:
            return
        conn = frontend.connection
        if conn.closed or conn in self._watched_connections:
            return
        try:
            fd = os.dup(conn.fileno())
        except OSError as exc:  # out of descriptors: the loss shows at the next change
            log.warning("cannot watch vhost-user back-end '%s': %s", backend.name, exc)
            return

        def unwatch() -> None:  # on the loop
            if self._watched_connections.pop(conn, None) is not None:
                loop.remove_reader(fd)
                os.close(fd)

        def closed() -> None:  # whichever thread closes the connection
            if threading.get_ident() == self._loop_thread:
                unwatch()
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(unwatch)

        loop.add_reader(fd, self._backend_readable, backend, conn, fd)
        conn.close_listeners.append(closed)
        self._watched_connections[conn] = (closed, unwatch)

    def _backend_readable(
        self, backend: VhostUserConsumer, conn: VhostUserConnection, fd: int
    ) -> None:
        loop = self._loop
        assert loop is not None
        if backend.frontend is None or backend.frontend.connection is not conn or conn.closed:
            self._unwatch_connection(conn)  # no longer the back-end's connection
            return
        if self.runner is None:
            backend.check()  # a loss closes the connection, which ends the watch
            return
        runner = self.runner
        loop.remove_reader(fd)  # until the check is done: the socket stays readable

        async def check() -> None:
            try:
                # By the time the lock is ours, the guests' thread may have read what woke
                # the loop (the reply to its own request): then there is nothing to ask.
                await runner.run(lambda: backend.check(unasked_only=True))
            except MonitorError:
                return  # shutting down
            if conn in self._watched_connections:
                loop.add_reader(fd, self._backend_readable, backend, conn, fd)

        task = loop.create_task(check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _unwatch_connection(self, conn: VhostUserConnection) -> None:
        entry = self._watched_connections.get(conn)
        if entry is not None:
            closed, unwatch = entry
            if closed in conn.close_listeners:
                conn.close_listeners.remove(closed)
            unwatch()

    def _vhost_state_changed(self, consumer: VhostUserConsumer) -> None:
        """Tell clients that a vhost-user back-end was lost, is back or was removed (our
        extension); ``reason`` comes with a loss only."""
        if consumer.connected:
            self._watch_connection(consumer)  # a new connection after reconnect()
        data = {"id": consumer.name, "state": consumer.state.value}
        if consumer.state is ConnectionState.DISCONNECTED:
            data["reason"] = consumer.disconnect_reason or ""
        self._emit("X_VHOST_USER_STATE", data)

    def _unwatch_vhost(self, backend: VhostUserConsumer) -> None:
        self._watched_vhost.discard(backend)
        if self._vhost_state_changed in backend.state_listeners:
            backend.state_listeners.remove(self._vhost_state_changed)

    def _vhost_reconnect(self, args: dict[str, Any]) -> object:
        dev = self.machine.vhost_devices.get(args["id"])
        if dev is None:
            raise QMPCommandError(
                f"Device '{args['id']}' is not a vhost-user device", "DeviceNotFound"
            )
        dev.reconnect()
        return {}

    def close(self) -> None:
        """Stop listening to the devices (the server is closed by its owner)."""
        for dev in list(self._watched):
            self._unwatch(dev)
        for backend in list(self._watched_vhost):
            self._unwatch_vhost(backend)
        for conn in list(self._watched_connections):
            self._unwatch_connection(conn)
        for task in self._checks:
            task.cancel()

    def _unwatch(self, dev: MemoryDevice) -> None:
        self._watched.discard(dev)
        self._anon_paths.pop(dev, None)
        if self._size_changed in dev.size_change_listeners:
            dev.size_change_listeners.remove(self._size_changed)

    def qom_path(self, dev: MemoryDevice) -> str:
        """The device's canonical QOM path (the PCI proxy for virtio-mem)."""
        if dev.id is not None:
            return PERIPHERAL + dev.id
        path = self._anon_paths.get(dev)
        if path is None:
            # QEMU's "device[*]" child: the lowest index no present device holds.
            taken = set(self._anon_paths.values())
            index = next(i for i in range(len(taken) + 1) if ANON.format(i) not in taken)
            path = self._anon_paths[dev] = ANON.format(index)
        return path

    def _name(self, dev: MemoryDevice) -> str:
        return dev.id if dev.id is not None else self.qom_path(dev)

    # -- events ----------------------------------------------------------------------------------

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        # A command's events go out after its reply, as QEMU's do. On the loop that happens by
        # itself (delivery goes through the loop); a command in the runner's worker holds them.
        if self._held_events is not None:
            self._held_events.append((name, data))
        else:
            self.server.emit_event(name, data)

    def _size_changed(self, dev: MemoryDevice, size: int) -> None:
        data: dict[str, Any] = {} if dev.id is None else {"id": dev.id}
        data["size"] = size
        # QEMU names the virtio-mem-pci proxy here (and throttles by this path).
        data["qom-path"] = self.qom_path(dev)
        self._emit("MEMORY_DEVICE_SIZE_CHANGE", data)

    def _device_deleted(self, dev_id: str | None, path: str) -> None:
        data: dict[str, Any] = {} if dev_id is None else {"device": dev_id}
        data["path"] = path
        self._emit("DEVICE_DELETED", data)

    # -- the command table -----------------------------------------------------------------------

    def _commands(self) -> list[Command]:
        size_arg = Param("size", "size")
        backend_common = (
            size_arg,
            Param("share", "bool", True),
            Param("reserve", "bool", True),
            Param("prealloc", "bool", True),
        )
        # These never touch the machine: they are answered at once, whatever else runs.
        free = [
            Command("query-status", self._query_status, exclusive=False),
            Command("query-version", self._query_version, exclusive=False),
            Command("query-commands", self._query_commands, exclusive=False),
            Command("quit", self._quit, exclusive=False),
        ]
        machine = [
            Command("stop", self._stop),
            Command("cont", self._cont),
            Command("system_reset", self._system_reset),
            Command("query-memory-devices", self._query_memory_devices),
            Command("query-memory-size-summary", self._query_memory_size_summary),
            Command("qom-get", self._qom_get, (Param("path", "str"), Param("property", "str"))),
            Command(
                "qom-set",
                self._qom_set,
                (Param("path", "str"), Param("property", "str"), Param("value", "any")),
            ),
            Command(
                "object-add",
                self._object_add,
                (Param("qom-type", "str"), Param("id", "str")),
                discriminator="qom-type",
                branches={
                    "memory-backend-ram": backend_common,
                    "memory-backend-file": (*backend_common, Param("mem-path", "str")),
                    "memory-backend-memfd": (
                        *backend_common,
                        Param("hugetlb", "bool", True),
                        Param("hugetlbsize", "size", True),
                        Param("seal", "bool", True),
                    ),
                },
            ),
            Command("object-del", self._object_del, (Param("id", "str"),)),
            Command(
                "device_add",
                self._device_add,
                (Param("driver", "str"), Param("id", "str", True)),
                open_args=True,
            ),
            Command("device_del", self._device_del, (Param("id", "str"),)),
            Command("x-query-memslots", self._query_memslots),
            Command("x-query-memslot-budget", self._query_budget),
            Command("x-query-kernel-metadata", self._query_kernel_metadata),
            Command("x-vhost-user-reconnect", self._vhost_reconnect, (Param("id", "str"),)),
            Command(
                "x-guest-memory-access",
                self._guest_memory_access,
                (
                    Param("address", "uint64"),
                    Param("write", "bool", True),
                    Param("value", "int", True),
                ),
            ),
            Command(
                "x-query-virtio-mem-guest", self._query_virtio_mem_guest, (Param("id", "str"),)
            ),
            Command("x-query-guest", self._query_guest, (Param("verify", "bool", True),)),
        ]
        return free + [
            dataclasses.replace(c, handler=self._machine_command(c.handler)) for c in machine
        ]

    def _machine_command(self, handler: Handler) -> Handler:
        """``handler`` as a command on the machine: in the runner's worker, if there is one."""
        runner = self.runner
        if runner is None:
            return handler

        async def in_machine(args: dict[str, Any]) -> object:
            held: list[tuple[str, dict[str, Any]]] = []

            def call() -> object:
                self._held_events = held
                try:
                    return handler(args)
                finally:
                    self._held_events = None

            try:
                return await runner.run(call)
            finally:
                for name, data in held:
                    self.server.emit_event(name, data)

        return in_machine

    # -- general ---------------------------------------------------------------------------------

    def _query_status(self, args: dict[str, Any]) -> object:
        status = self.runtime.status()
        return {"status": status, "singlestep": False, "running": status == RUNNING}

    def _query_version(self, args: dict[str, Any]) -> object:
        return self.server.greeting["QMP"]["version"]

    def _query_commands(self, args: dict[str, Any]) -> object:
        return [{"name": name} for name in self.server.command_names()]

    def _quit(self, args: dict[str, Any]) -> object:
        self.server.emit_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        # After this handler returns its reply is queued; only then may the runtime stop.
        asyncio.get_running_loop().call_soon(self.runtime.quit)
        return {}

    def _stop(self, args: dict[str, Any]) -> object:
        # STOP and RESUME are the runtime's: a migration stops and resumes the VM too.
        state = self.runtime.status()
        if state == INMIGRATE:
            self.runtime.autostart = False
        elif state == RUNNING:  # as QEMU's vm_stop: a VM that does not run keeps its state
            self.runtime.stop()
        return {}

    def _cont(self, args: dict[str, Any]) -> object:
        state = self.runtime.status()
        if state in NEEDS_RESET:
            raise QMPCommandError("Resetting the Virtual Machine is required")
        if state == FINISH_MIGRATE:
            raise QMPCommandError("Migration is not finalized yet")
        if state == INMIGRATE:
            self.runtime.autostart = True
        elif state != RUNNING:
            self.runtime.cont()
        return {}

    def _system_reset(self, args: dict[str, Any]) -> object:
        if self.migrating():
            # A reset unplugs all memory: the bitmap a migration sends must not change.
            raise QMPCommandError("system_reset not allowed while migrating")
        # QEMU resets in its main loop and then sends the event; commands run one at a time
        # here, so the reset is done before anyone sees the reply or the event.
        self.runtime.system_reset()
        self._emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
        return {}

    def guest_memory_fault(self, fault: GuestFault) -> None:
        """Tell clients that a guest access to memory out of its reach stopped the VM:
        ``X_GUEST_MEMORY_FAULT`` (our extension), then QEMU's ``STOP``."""
        data: dict[str, Any] = {}
        if fault.device is not None:
            if fault.device.id is not None:
                data["id"] = fault.device.id
            data["qom-path"] = self.qom_path(fault.device)
        data.update(address=fault.address, size=fault.size)
        if fault.access is not None:
            data["access"] = fault.access
        if fault.block_address is not None:
            data["block-address"] = fault.block_address
        data["detected-by"] = fault.detected_by
        self._emit("X_GUEST_MEMORY_FAULT", data)
        self._emit("STOP", {})

    def _guest_memory_access(self, args: dict[str, Any]) -> object:
        write = bool(args.get("write", False))
        value = int(args.get("value", 0))
        if not 0 <= value <= 0xFF:
            raise QMPCommandError("Parameter 'value' expects a byte (0 to 255)")
        try:
            result = self.runtime.guest_memory_access(args["address"], write=write, value=value)
        except GuestMemoryFault:
            return {"outcome": "fault"}
        except ValueError as exc:  # an address the guest cannot reach at all
            raise QMPCommandError(f"Parameter 'address': {exc}") from exc
        if result is None:
            return {"outcome": "mmio"}
        return {"outcome": "ram"} if write else {"outcome": "ram", "value": result}

    # -- memory devices --------------------------------------------------------------------------

    def _query_memory_devices(self, args: dict[str, Any]) -> object:
        return [d.info() for d in self.machine.memory_devices]

    def _query_memory_size_summary(self, args: dict[str, Any]) -> object:
        m = self.machine
        return {
            "base-memory": m.config.memory.ram_size,
            "plugged-memory": sum(d.get_plugged_size() for d in m.memory_devices),
        }

    # -- QOM -------------------------------------------------------------------------------------

    def _qom_objects(self) -> dict[str, QomObject]:
        objects: dict[str, QomObject] = {}
        for dev in self.machine.memory_devices:
            path = self.qom_path(dev)
            for child, obj in dev.qom_objects().items():
                objects[f"{path}/{child}" if child else path] = obj
        for backend in self.machine.backends.values():
            objects[backend.qom_path] = _backend_props(backend)
        return objects

    def _resolve(self, path: str) -> QomObject:
        objects = self._qom_objects()
        found: QomObject | None
        if path.startswith("/"):
            found = objects.get(path)
        else:
            parts = path.split("/")
            matches = [o for p, o in objects.items() if p.split("/")[-len(parts) :] == parts]
            # QEMU treats an ambiguous partial path like a missing one.
            found = matches[0] if len(matches) == 1 else None
        if found is None:
            raise QMPCommandError(f"Device '{path}' not found", "DeviceNotFound")
        return found

    def _property(self, args: dict[str, Any]) -> tuple[QomObject, QomProperty]:
        obj = self._resolve(args["path"])
        name = args["property"]
        prop = obj.props.get(name)
        if prop is None:
            raise QMPCommandError(f"Property '{obj.type_name}.{name}' not found")
        return obj, prop

    def _qom_get(self, args: dict[str, Any]) -> object:
        return self._property(args)[1].get()

    def _qom_set(self, args: dict[str, Any]) -> object:
        obj, prop = self._property(args)
        if prop.set is None:
            raise QMPCommandError(f"Property '{obj.type_name}.{args['property']}' is not writable")
        value = args["value"]
        if prop.type is not None:
            value = check_value(args["property"], prop.type, value)
        prop.set(value)
        return {}

    # -- objects and devices ---------------------------------------------------------------------

    def _object_add(self, args: dict[str, Any]) -> object:
        _check_id(args["id"])
        self.machine.add_backend(backend_from_args(args))
        return {}

    def _object_del(self, args: dict[str, Any]) -> object:
        self.machine.remove_backend(args["id"])
        return {}

    def _device_add(self, args: dict[str, Any]) -> object:
        if self.migrating():
            raise QMPCommandError("device_add not allowed while migrating")
        dev_id = args.get("id")
        if dev_id is not None:
            _check_id(dev_id)
        for provider in self._providers:
            if args["driver"] in provider.drivers():
                provider.add_device(args)
                self.sync_devices()
                return {}
        dev = self.machine.add_device(device_from_args(args))
        dev.hotplugged = True
        self.sync_devices()
        try:
            for cb in list(self.device_added):
                cb(dev)
        except Exception:
            # The runtime could not take the device (e.g. no room for its guest driver):
            # undo the plug, so an error reply never leaves a device behind.
            self.machine.withdraw_device(dev)
            self.sync_devices()
            raise
        return {}

    def _device_del(self, args: dict[str, Any]) -> object:
        if self.migrating():
            raise QMPCommandError("device_del not allowed while migrating")
        given: str = args["id"]
        dev_id = given.removeprefix(PERIPHERAL)
        path = PERIPHERAL + dev_id
        for provider in self._providers:
            if provider.has_device(dev_id):
                provider.remove_device(dev_id)
                self._device_deleted(dev_id, path)
                return {}
        dev = None if "/" in dev_id else self.machine.devices.get(dev_id)
        if dev is None:
            # An anonymous device is named by its QOM path only.
            dev = next(
                (
                    d
                    for d in self.machine.memory_devices
                    if d.id is None and self.qom_path(d) == given
                ),
                None,
            )
            if dev is None:
                raise QMPCommandError(f"Device '{given}' not found", "DeviceNotFound")
            dev.check_unplug()
            self.machine.withdraw_device(dev)
            self.sync_devices()
            self._device_deleted(None, given)
            return {}
        self.machine.remove_device(dev_id)
        self.sync_devices()
        for child in dev.qom_children:
            # QEMU unrealizes the proxy's virtio device (anonymous) first.
            self._device_deleted(None, f"{path}/{child}")
        self._device_deleted(dev_id, path)
        for cb in list(self.device_removed):
            cb(dev_id)
        return {}

    # -- extensions ------------------------------------------------------------------------------

    def _query_memslots(self, args: dict[str, Any]) -> object:
        return to_qmp(memslot_report(self.machine, self._name))

    def _query_budget(self, args: dict[str, Any]) -> object:
        return to_qmp(budget_report(self.machine))

    def _query_kernel_metadata(self, args: dict[str, Any]) -> object:
        # On the real kernel, kernel memory charged since the process's meter opened
        # (``memslots run`` opens it before the VM exists).
        kmem = self._kmem_meter() if self.machine.vm.is_real else None
        return to_qmp(kernel_metadata_report(self.machine, self._name, kmem=kmem))

    def _query_virtio_mem_guest(self, args: dict[str, Any]) -> object:
        dev_id = args["id"].removeprefix(PERIPHERAL)
        gvm = self.runtime.guest
        guest = gvm.guests.get(dev_id) if gvm is not None else None
        if guest is None:
            if dev_id not in self.machine.devices:
                raise QMPCommandError(f"Device '{args['id']}' not found", "DeviceNotFound")
            raise QMPCommandError(f"no guest driver is attached to '{dev_id}'")
        # idle: no pass queued and no retry timer armed; only a new request moves it then.
        info: dict[str, object] = {"idle": guest.idle}
        if guest.stop_reason is not None:
            info["stop-reason"] = guest.stop_reason
        if guest.timer_due is not None:
            info["retry-in"] = max(0.0, guest.timer_due - guest.sched.now())
        return info

    def _query_guest(self, args: dict[str, Any]) -> object:
        guests = self.runtime.guest
        if guests is None:
            raise QMPCommandError("the machine runs without a guest (-guest none)")
        # The checks run here, between two guest passes (commands and guests share the loop).
        checked = guests.verify() if args.get("verify", False) else None
        return to_qmp(guest_report(guests, checked))

    def _kmem_meter(self) -> KmemMeter:
        if self._kmem is None:
            self._kmem = current_or_system_meter()
        return self._kmem
