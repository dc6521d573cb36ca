"""The QMP commands of a running machine: QEMU's monitor over a :class:`Machine`.

Commands, arguments, result fields and error texts are QEMU 8.2's (``qemu-behaviour.md`` §6):
``query-status``, ``quit``, ``query-memory-devices``, ``query-memory-size-summary``,
``qom-get``/``qom-set`` (virtio-mem, pc-dimm and memory-backend properties),
``object-add``/``object-del`` for memory backends and ``device_add``/``device_del`` for
``virtio-mem`` and ``pc-dimm``. Our extensions follow QEMU's ``x-`` convention:
``x-query-memslots`` (every memslot of every memory device and who maps it),
``x-query-memslot-budget`` and ``x-query-kernel-metadata``.

Events: ``MEMORY_DEVICE_SIZE_CHANGE`` on every change of a virtio-mem device's ``size``
(rate-limited per ``qom-path`` by the server, as QEMU's monitor does), ``DEVICE_DELETED``
after ``device_del`` and ``SHUTDOWN`` on ``quit``.

QOM paths are QEMU's: a device with an id is ``/machine/peripheral/<id>`` (the virtio-mem-pci
proxy; its virtio device is the child ``virtio-backend``), one without is
``/machine/peripheral-anon/device[N]``, a backend is ``/objects/<id>``. Partial paths (``vmem0``)
resolve when they name exactly one object, as QEMU's ``object_resolve_path`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from memslots.devices.dimm import PcDimm
from memslots.devices.memory_device import MemoryDevice
from memslots.devices.virtio_mem import VirtioMem
from memslots.errors import PropertyError
from memslots.machine.machine import Machine
from memslots.measure import sample_vmalloc_used
from memslots.memory.address_space import Section
from memslots.memory.backends import MemoryBackend
from memslots.memory.consumer import MemslotConsumer
from memslots.monitor.qmp_server import Command, Param, QMPCommandError, QMPServer, check_value
from memslots.options import backend_from_args, device_from_args, id_wellformed
from memslots.vhost.user import ConnectionState, VhostUserConsumer

#: QEMU's RunState values that count as running for ``query-status``.
RUNNING = "running"
PERIPHERAL = "/machine/peripheral/"
VIRTIO_CHILD = "virtio-backend"
#: The type of the object behind ``/machine/peripheral/<id>`` for ``-device virtio-mem`` on x86.
VIRTIO_MEM_PROXY = "virtio-mem-pci"


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


@dataclass(frozen=True)
class _Prop:
    """A QOM property: a getter and, when it may be set at all, a setter."""

    get: Callable[[], object]
    set: Callable[[object], None] | None = None


@dataclass(frozen=True)
class _QomObject:
    type_name: str
    props: dict[str, _Prop]


def _connected(consumer: MemslotConsumer) -> bool:
    """False for a vhost-user back-end that was lost (it then holds none of our memory)."""
    return not isinstance(consumer, VhostUserConsumer) or (
        consumer.state is ConnectionState.CONNECTED
    )


def _check_id(text: str) -> None:
    if not id_wellformed(text):
        raise QMPCommandError("Parameter 'id' expects an identifier")


def _refuse_after_realize(
    prop: str, dev_id: str | None, type_name: str, *, link: bool = False
) -> Callable[[object], None]:
    """The setter of a qdev property of a realized device: QEMU's refusal, value unread."""

    def refuse(value: object) -> None:
        if link:
            # QEMU formats the id with %s; glibc prints a NULL id as "(null)".
            who = dev_id if dev_id is not None else "(null)"
            raise PropertyError(
                f"Attempt to set link property '{prop}' on device '{who}' "
                f"(type '{type_name}') after it was realized"
            )
        who = f"device '{dev_id}'" if dev_id is not None else "anonymous device"
        raise PropertyError(
            f"Attempt to set property '{prop}' on {who} (type '{type_name}') after it was realized"
        )

    return refuse


def _refuse(message: str) -> Callable[[object], None]:
    def refuse(value: object) -> None:
        raise PropertyError(message)

    return refuse


def _virtio_mem_props(dev: VirtioMem, type_name: str) -> _QomObject:
    # The proxy's properties forward to its virtio device, an anonymous "virtio-mem": QEMU's
    # refusals therefore name that device whichever path was used.
    def static(name: str) -> Callable[[object], None]:
        return _refuse_after_realize(name, None, "virtio-mem")

    def set_requested(value: object) -> None:
        dev.set_requested_size(check_value("requested-size", "size", value))

    memdev = dev.memdev
    assert memdev is not None, "a realized virtio-mem device has a memdev"
    return _QomObject(
        type_name,
        {
            "type": _Prop(lambda: type_name),
            "memdev": _Prop(
                lambda: memdev.qom_path,
                _refuse_after_realize("memdev", None, "virtio-mem", link=True),
            ),
            "memaddr": _Prop(lambda: dev.addr, static("memaddr")),
            "node": _Prop(lambda: dev.node, static("node")),
            "requested-size": _Prop(lambda: dev.requested_size, set_requested),
            # Read-only on the virtio device, which the proxy's alias forwards to.
            "size": _Prop(lambda: dev.size, _refuse("Property 'virtio-mem.size' is not writable")),
            # A realized device refuses before it looks at the value (QEMU's order).
            "block-size": _Prop(lambda: dev.block_size, _refuse("'block-size' cannot be changed")),
            "prealloc": _Prop(lambda: dev.opts.prealloc, static("prealloc")),
            "unplugged-inaccessible": _Prop(
                lambda: dev.unplugged_inaccessible, static("unplugged-inaccessible")
            ),
            "dynamic-memslots": _Prop(
                lambda: dev.opts.dynamic_memslots, static("dynamic-memslots")
            ),
            "memslot-size": _Prop(lambda: dev.opts.memslot_size or 0, static("memslot-size")),
        },
    )


def _dimm_props(dev: PcDimm) -> _QomObject:
    def static(name: str) -> Callable[[object], None]:
        return _refuse_after_realize(name, dev.id, "pc-dimm")

    memdev = dev.memdev
    assert memdev is not None, "a realized pc-dimm has a memdev"
    return _QomObject(
        "pc-dimm",
        {
            "type": _Prop(lambda: "pc-dimm"),
            "addr": _Prop(lambda: dev.addr, static("addr")),
            "node": _Prop(lambda: dev.node, static("node")),
            "slot": _Prop(lambda: dev.slot, static("slot")),
            "memdev": _Prop(
                lambda: memdev.qom_path,
                _refuse_after_realize("memdev", dev.id, "pc-dimm", link=True),
            ),
            "size": _Prop(lambda: memdev.size),
        },
    )


def _backend_props(backend: MemoryBackend) -> _QomObject:
    qom_type = backend.opts.qom_type
    fixed = _refuse("cannot change property value")
    return _QomObject(
        qom_type,
        {
            "type": _Prop(lambda: qom_type),
            # QEMU's text, trailing space included.
            "size": _Prop(
                lambda: backend.size, _refuse(f"cannot change property size of {qom_type} ")
            ),
            "share": _Prop(lambda: backend.opts.share, fixed),
            "reserve": _Prop(lambda: backend.opts.reserve, fixed),
            # QEMU would preallocate now; we keep the backend as it was created.
            "prealloc": _Prop(lambda: backend.opts.prealloc, fixed),
        },
    )


class Monitor:
    """The commands and events of one running machine, registered in a :class:`QMPServer`.

    ``device_added`` and ``device_removed`` are called after a successful ``device_add``
    (with the memory device) and ``device_del`` (with the id), so the runtime can attach or
    detach guest drivers.
    """

    def __init__(self, runtime: Runtime, server: QMPServer | None = None) -> None:
        self.runtime = runtime
        self.server = server if server is not None else QMPServer()
        self.device_added: list[Callable[[MemoryDevice], None]] = []
        self._watched_vhost: set[int] = set()
        self.device_removed: list[Callable[[str], None]] = []
        self._providers: list[DeviceProvider] = []
        self._hotplugged: set[MemoryDevice] = set()
        self._anon_paths: dict[MemoryDevice, str] = {}
        self._watched: set[VirtioMem] = set()
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
        """Watch the size of every virtio-mem device; forget removed ones.

        Called for the machine's devices at start and after ``device_add``/``device_del``;
        a runtime that plugs devices by other means calls it too.
        """
        present = [d for d in self.machine.memory_devices if isinstance(d, VirtioMem)]
        for dev in present:
            if dev not in self._watched:
                dev.size_change_listeners.append(self._size_changed)
                self._watched.add(dev)
        for dev in [d for d in self._watched if d not in present]:
            self._unwatch(dev)
        for backend in self.machine.vhost.backends:
            if isinstance(backend, VhostUserConsumer) and id(backend) not in self._watched_vhost:
                backend.state_listeners.append(self._vhost_state_changed)
                self._watched_vhost.add(id(backend))

    def _vhost_state_changed(self, consumer: VhostUserConsumer) -> None:
        """Tell clients that a vhost-user back-end was lost or is back (our extension)."""
        self.server.emit_event(
            "X_VHOST_USER_STATE",
            {
                "id": consumer.name,
                "state": consumer.state.value,
                "reason": consumer.disconnect_reason or "",
            },
        )

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

    def _unwatch(self, dev: VirtioMem) -> None:
        self._watched.discard(dev)
        if self._size_changed in dev.size_change_listeners:
            dev.size_change_listeners.remove(self._size_changed)

    def qom_path(self, dev: MemoryDevice) -> str:
        """The device's canonical QOM path (the proxy for virtio-mem)."""
        if dev.id is not None:
            return PERIPHERAL + dev.id
        path = self._anon_paths.get(dev)
        if path is None:
            path = f"/machine/peripheral-anon/device[{len(self._anon_paths)}]"
            self._anon_paths[dev] = path
        return path

    def _name(self, dev: MemoryDevice) -> str:
        return dev.id if dev.id is not None else self.qom_path(dev)

    # -- events ----------------------------------------------------------------------------------

    def _size_changed(self, dev: VirtioMem, size: int) -> None:
        data: dict[str, Any] = {} if dev.id is None else {"id": dev.id}
        data["size"] = size
        # QEMU names the virtio-mem-pci proxy here (and throttles by this path).
        data["qom-path"] = self.qom_path(dev)
        self.server.emit_event("MEMORY_DEVICE_SIZE_CHANGE", data)

    def _device_deleted(self, dev_id: str | None, path: str) -> None:
        data: dict[str, Any] = {} if dev_id is None else {"device": dev_id}
        data["path"] = path
        self.server.emit_event("DEVICE_DELETED", data)

    # -- the command table -----------------------------------------------------------------------

    def _commands(self) -> list[Command]:
        size_arg = Param("size", "size")
        backend_common = (
            size_arg,
            Param("share", "bool", True),
            Param("reserve", "bool", True),
            Param("prealloc", "bool", True),
        )
        return [
            Command("query-status", self._query_status),
            Command("query-version", self._query_version),
            Command("query-commands", self._query_commands),
            Command("quit", self._quit),
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
        ]

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

    # -- memory devices --------------------------------------------------------------------------

    def _device_info(self, dev: MemoryDevice) -> dict[str, Any]:
        data: dict[str, Any] = {} if dev.id is None else {"id": dev.id}
        if isinstance(dev, VirtioMem):
            assert dev.memdev is not None
            data.update(
                {
                    "memaddr": dev.addr,
                    "requested-size": dev.requested_size,
                    "size": dev.size,
                    "max-size": dev.region_size,
                    "block-size": dev.block_size,
                    "node": dev.node,
                    "memdev": dev.memdev.qom_path,
                }
            )
            return {"type": "virtio-mem", "data": data}
        assert isinstance(dev, PcDimm) and dev.memdev is not None, dev
        data.update(
            {
                "addr": dev.addr,
                "size": dev.memdev.size,
                "slot": dev.slot,
                "node": dev.node,
                "memdev": dev.memdev.qom_path,
                "hotplugged": dev in self._hotplugged,
                "hotpluggable": True,
            }
        )
        return {"type": "dimm", "data": data}

    def _query_memory_devices(self, args: dict[str, Any]) -> object:
        return [self._device_info(d) for d in self.machine.memory_devices]

    def _query_memory_size_summary(self, args: dict[str, Any]) -> object:
        m = self.machine
        return {
            "base-memory": m.config.memory.ram_size,
            "plugged-memory": sum(d.get_plugged_size() for d in m.memory_devices),
        }

    # -- QOM -------------------------------------------------------------------------------------

    def _qom_objects(self) -> dict[str, _QomObject]:
        objects: dict[str, _QomObject] = {}
        for dev in self.machine.memory_devices:
            path = self.qom_path(dev)
            if isinstance(dev, VirtioMem):
                objects[path] = _virtio_mem_props(dev, VIRTIO_MEM_PROXY)
                objects[f"{path}/{VIRTIO_CHILD}"] = _virtio_mem_props(dev, "virtio-mem")
            else:
                assert isinstance(dev, PcDimm), dev
                objects[path] = _dimm_props(dev)
        for backend in self.machine.backends.values():
            objects[backend.qom_path] = _backend_props(backend)
        return objects

    def _resolve(self, path: str) -> _QomObject:
        objects = self._qom_objects()
        found: _QomObject | None
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

    def _property(self, args: dict[str, Any]) -> tuple[_QomObject, _Prop]:
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
        prop.set(args["value"])
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
        dev_id = args.get("id")
        if dev_id is not None:
            _check_id(dev_id)
        for provider in self._providers:
            if args["driver"] in provider.drivers():
                provider.add_device(args)
                self.sync_devices()
                return {}
        dev = self.machine.add_device(device_from_args(args))
        self._hotplugged.add(dev)
        self.sync_devices()
        try:
            for cb in list(self.device_added):
                cb(dev)
        except Exception:
            # The runtime could not take the device (e.g. no room for its guest driver):
            # undo the plug, so an error reply never leaves a device behind.
            self.machine.withdraw_device(dev)
            self._hotplugged.discard(dev)
            self.sync_devices()
            raise
        return {}

    def _device_del(self, args: dict[str, Any]) -> object:
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
            if isinstance(dev, VirtioMem):
                dev.check_unplug()
            self.machine.withdraw_device(dev)
            self._hotplugged.discard(dev)
            self.sync_devices()
            self._device_deleted(None, given)
            return {}
        self.machine.remove_device(dev_id)
        self._hotplugged.discard(dev)
        self.sync_devices()
        if isinstance(dev, VirtioMem):
            # QEMU unrealizes the proxy's virtio device (anonymous) first.
            self._device_deleted(None, f"{path}/{VIRTIO_CHILD}")
        self._device_deleted(dev_id, path)
        for cb in list(self.device_removed):
            cb(dev_id)
        return {}

    # -- extensions ------------------------------------------------------------------------------

    def _query_memslots(self, args: dict[str, Any]) -> object:
        m = self.machine
        sections = {s.gpa: s for s in m.address_space.sections}
        out: list[dict[str, Any]] = []

        def entry(
            dev: MemoryDevice, index: int, gpa: int, size: int, mapped: bool, blocks: int | None
        ) -> None:
            item: dict[str, Any] = {
                "device": self._name(dev),
                "index": index,
                "addr": gpa,
                "size": size,
                "mapped": mapped,
            }
            if blocks is not None:
                item["plugged-blocks"] = blocks
            section = sections.get(gpa) if mapped else None
            if section is not None:
                slot = m.kvm.slot_of(section)
                if slot is not None:
                    item["kvm-slot"] = slot
                # A mapped section is held by every back-end that takes it: a refusal would
                # have undone the whole transaction.
                item["vhost"] = [
                    b.name for b in m.vhost.backends if b.accepts(section) and _connected(b)
                ]
            else:
                item["vhost"] = []
            out.append(item)

        for dev in m.memory_devices:
            if isinstance(dev, VirtioMem):
                for ms in dev.memslot_map():
                    entry(dev, ms.index, ms.gpa, ms.size, ms.mapped, ms.plugged_blocks)
            else:
                assert isinstance(dev, PcDimm) and dev.memdev is not None, dev
                entry(dev, 0, dev.addr, dev.memdev.size, dev.memdev.region.mapped, None)
        return out

    def _query_budget(self, args: dict[str, Any]) -> object:
        m = self.machine
        consumers = [m.kvm, *m.vhost.backends]
        result: dict[str, Any] = {
            "consumers": [
                {
                    "name": c.name,
                    "max": c.max_memslots,
                    "used": c.used_memslots,
                    "free": c.free_memslots,
                    "connected": _connected(c),
                }
                for c in consumers
            ],
            # KVM_X86_QUIRK_SLOT_ZAP_ALL in effect: every memslot delete zaps all shadow pages.
            "slot-zap-all": m.vm.slot_zap_all,
        }
        dm = m.device_memory
        if dm is not None:
            result["device-memory"] = {
                "required": dm.required_memslots,
                "used": dm.used_memslots,
                "reserved": dm.reserved_memslots,
                "auto-decision": dm.auto_decision,
                "total-space": dm.total_space,
                "used-space": dm.used_region_size,
            }
        return result

    def _query_kernel_metadata(self, args: dict[str, Any]) -> object:
        m = self.machine
        devices = []
        for dev in m.memory_devices:
            mr = dev.get_memory_region()
            assert mr is not None, "plugged memory devices have a region"
            lo, hi = dev.get_addr(), dev.get_addr() + mr.size

            def inside(s: Section, lo: int = lo, hi: int = hi) -> bool:
                return lo <= s.gpa < hi

            devices.append(
                {"device": self._name(dev), "model": m.kvm.predicted_metadata_bytes(inside)}
            )
        result: dict[str, Any] = {
            "model": m.kvm.predicted_metadata_bytes(),
            "memslots": len(m.kvm.slots()),
            "devices": devices,
            "real": m.vm.is_real,
        }
        if m.vm.is_real:
            result["vmalloc-used"] = sample_vmalloc_used()
        return result
