"""The monitor's commands and events over a machine on the KVM model, through qemu.qmp."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
from backends import FakeBackend, QemuStorageDaemon
from conftest import requires_qsd
from qemu.qmp import ExecuteError, QMPClient
from qmp_support import (
    FakeRuntime,
    ManualClock,
    RawClient,
    make_machine,
    next_event,
    qmp_client,
    queued_event,
    sent_so_far,
    serving,
    snapshot,
    socket_dir,
)

from memslots.devices.memory_device import MemoryDevice
from memslots.guest.inorder import drive_to
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.machine.runner import MachineRunner
from memslots.monitor.commands import Monitor
from memslots.monitor.qmp_server import QMPServer
from memslots.monitor.runtime import VhostUserProvider
from memslots.options import parse_machine_config
from memslots.sizes import GiB, MiB
from memslots.vhost.backend import VhostModel

VMEM = "/machine/peripheral/vmem0"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def error_of(
    qmp: QMPClient, command: str, args: dict[str, Any] | None = None
) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as info:
        await qmp.execute(command, args)
    return info.value.error_class, str(info.value)


def test_query_memory_devices_is_qemu_shaped() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path), qmp_client(path) as qmp:
                devices = await qmp.execute("query-memory-devices")
        vmem, dimm = m.virtio_mem("vmem0"), m.devices["dimm0"]
        assert devices == [
            {
                "type": "virtio-mem",
                "data": {
                    "id": "vmem0",
                    "memaddr": vmem.addr,
                    "requested-size": 0,
                    "size": 0,
                    "max-size": 8 * GiB,
                    "block-size": 2 * MiB,
                    "node": 0,
                    "memdev": "/objects/mem0",
                },
            },
            {
                "type": "dimm",
                "data": {
                    "id": "dimm0",
                    "addr": dimm.get_addr(),
                    "size": GiB,
                    "slot": 0,
                    "node": 0,
                    "memdev": "/objects/mem1",
                    "hotplugged": False,
                    "hotpluggable": True,
                },
            },
        ]
        assert vmem.addr == 5 * GiB  # RAM: 3 GiB below 4 GiB, 1 GiB above; device memory next

    run(main())


def test_resize_events_rate_limit_and_memslot_map() -> None:
    """qom-set, the guest plugs in many steps within a second: one event now, one at the end."""
    clock = ManualClock()

    async def main() -> None:
        with make_machine() as m:
            dev = m.virtio_mem("vmem0")
            async with serving(m, clock=clock) as (_, path), qmp_client(path) as qmp:
                with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as events:
                    reply = await qmp.execute(
                        "qom-set", {"path": "vmem0", "property": "requested-size", "value": 3 * GiB}
                    )
                    assert reply == {}
                    assert (
                        await qmp.execute("qom-get", {"path": VMEM, "property": "requested-size"})
                        == 3 * GiB
                    )
                    # 12 size changes of 256 MiB, 1/16 s apart (binary fractions: exact times)
                    for step in range(1, 13):
                        drive_to(dev, step * 256 * MiB)
                        await sent_so_far(qmp)  # the server has queued the event
                        clock.advance(0.0625)
                    first = await queued_event(events)
                    assert first["data"] == {"id": "vmem0", "size": 256 * MiB, "qom-path": VMEM}
                    assert events.empty()  # the others are held until the 1 s period ends
                    clock.advance(0.25)  # now 1 s after the first event
                    await sent_so_far(qmp)
                    last = await queued_event(events)
                    assert last["data"] == {"id": "vmem0", "size": 3 * GiB, "qom-path": VMEM}
                    clock.advance(1.0)
                    await sent_so_far(qmp)
                    assert events.empty()  # nothing else was pending
                    # Each event keeps the time it was raised at.
                    stamps = [
                        (e["timestamp"]["seconds"], e["timestamp"]["microseconds"])
                        for e in (first, last)
                    ]
                    assert stamps == [(1_700_000_000, 0), (1_700_000_000, 687_500)]
                size = await qmp.execute("qom-get", {"path": VMEM, "property": "size"})
                assert size == 3 * GiB
                memslots = await qmp.execute("x-query-memslots")
                summary = await qmp.execute("query-memory-size-summary")
                budget = await qmp.execute("x-query-memslot-budget")
        assert isinstance(memslots, list)
        vmem_slots = [s for s in memslots if s["device"] == "vmem0"]
        assert len(vmem_slots) == 8
        mapped = [s["index"] for s in vmem_slots if s["mapped"]]
        assert mapped == [0, 1, 2]  # exactly the memslots holding plugged blocks
        for s in vmem_slots:
            assert s["address"] == dev.addr + s["index"] * GiB and s["size"] == GiB
            assert s["plugged-blocks"] == (512 if s["mapped"] else 0)
            assert ("kvm-slot" in s) == s["mapped"]
            assert s["vhost"] == []
        sections = {x.gpa: x for x in m.address_space.sections}
        for s in vmem_slots[:3]:
            assert s["kvm-slot"] == m.kvm.slot_of(sections[s["address"]])
        dimm = [s for s in memslots if s["device"] == "dimm0"]
        assert len(dimm) == 1 and dimm[0]["mapped"] and "plugged-blocks" not in dimm[0]
        assert summary == {"base-memory": 4 * GiB, "plugged-memory": 4 * GiB}
        kvm = budget["consumers"][0]
        assert kvm["name"] == "kvm" and kvm["used-memslots"] == m.kvm.used_memslots
        assert kvm["used-memslots"] + kvm["free-memslots"] == kvm["max-memslots"]
        assert kvm["connected"] is True
        assert kvm["slot-zap-all"] is False  # -accel's default: the quirk is disabled
        assert all("slot-zap-all" not in c for c in budget["consumers"][1:])
        assert m.device_memory is not None
        assert budget["device-memory"] == {
            "base": m.device_memory.base,
            "size": m.device_memory.size,
            "total-space": 12 * GiB,
            "used-space": 9 * GiB,
            "required-memslots": 9,
            "used-memslots": 4,
            "reserved-memslots": 5,
            "auto-decision-active": True,
        }

    run(main())


def test_qom_properties() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path), qmp_client(path) as qmp:

                async def get(p: str, prop: str) -> object:
                    return await qmp.execute("qom-get", {"path": p, "property": prop})

                for p in (VMEM, "vmem0", f"{VMEM}/virtio-backend", "virtio-backend"):
                    assert await get(p, "memdev") == "/objects/mem0"
                    assert await get(p, "block-size") == 2 * MiB
                    assert await get(p, "dynamic-memslots") is True
                    assert await get(p, "unplugged-inaccessible") == "on"
                    assert await get(p, "node") == 0
                assert await get(VMEM, "type") == "virtio-mem-pci"
                assert await get(f"{VMEM}/virtio-backend", "type") == "virtio-mem"
                assert await get(VMEM, "memaddr") == 5 * GiB
                assert await get("dimm0", "slot") == 0
                assert await get("/machine/peripheral/dimm0", "size") == GiB
                assert await get("/objects/mem2", "size") == 2 * GiB
                assert await get("mem0", "reserve") is False
                assert await get("mem0", "type") == "memory-backend-ram"
                cases = [
                    ("vmem0", "max-size", "Property 'virtio-mem-pci.max-size' not found"),
                    (f"{VMEM}/virtio-backend", "x", "Property 'virtio-mem.x' not found"),
                    ("dimm0", "requested-size", "Property 'pc-dimm.requested-size' not found"),
                ]
                for p, prop, desc in cases:
                    assert await error_of(qmp, "qom-get", {"path": p, "property": prop}) == (
                        "GenericError",
                        desc,
                    )

    run(main())


#: (command, arguments, error class, desc) — every one refused, nothing changed.
QMP_BAD_INPUTS: list[tuple[str, dict[str, Any] | None, str, str]] = [
    ("no-such-command", None, "CommandNotFound", "The command no-such-command has not been found"),
    ("query-status", {"verbose": True}, "GenericError", "Parameter 'verbose' is unexpected"),
    ("qom-get", {"path": VMEM}, "GenericError", "Parameter 'property' is missing"),
    ("qom-get", {"path": 5, "property": "size"}, "GenericError",
     "Invalid parameter type for 'path', expected: string"),
    ("qom-set", {"path": VMEM, "property": "requested-size"}, "GenericError",
     "Parameter 'value' is missing"),
    ("qom-set", {"path": VMEM, "property": "requested-size", "value": 3 * MiB}, "GenericError",
     "'requested-size' has to be multiples of 'block-size' (0x200000)"),
    ("qom-set", {"path": VMEM, "property": "requested-size", "value": 9 * GiB}, "GenericError",
     "'requested-size' cannot exceed the memory backend size(0x200000000)"),
    ("qom-set", {"path": VMEM, "property": "requested-size", "value": -2 * MiB}, "GenericError",
     "'requested-size' cannot exceed the memory backend size(0x200000000)"),
    ("qom-set", {"path": VMEM, "property": "requested-size", "value": "1G"}, "GenericError",
     "Parameter 'requested-size' expects uint64"),
    ("qom-set", {"path": VMEM, "property": "requested-size", "value": 1.5}, "GenericError",
     "Parameter 'requested-size' expects uint64"),
    ("qom-set", {"path": VMEM, "property": "requested-size", "value": True}, "GenericError",
     "Parameter 'requested-size' expects uint64"),
    ("qom-set", {"path": VMEM, "property": "requested-size", "value": 1 << 64}, "GenericError",
     "Parameter 'requested-size' expects uint64"),
    ("qom-set", {"path": VMEM, "property": "size", "value": GiB}, "GenericError",
     "Property 'virtio-mem.size' is not writable"),
    ("qom-set", {"path": VMEM, "property": "type", "value": "x"}, "GenericError",
     "Property 'virtio-mem-pci.type' is not writable"),
    ("qom-set", {"path": VMEM, "property": "block-size", "value": 4 * MiB}, "GenericError",
     "'block-size' cannot be changed"),
    ("qom-set", {"path": VMEM, "property": "memaddr", "value": 0}, "GenericError",
     "Attempt to set property 'memaddr' on anonymous device (type 'virtio-mem') after it was "
     "realized"),
    ("qom-set", {"path": VMEM, "property": "dynamic-memslots", "value": False}, "GenericError",
     "Attempt to set property 'dynamic-memslots' on anonymous device (type 'virtio-mem') after "
     "it was realized"),
    ("qom-set", {"path": VMEM, "property": "unplugged-inaccessible", "value": "off"},
     "GenericError", "Attempt to set property 'unplugged-inaccessible' on anonymous device "
     "(type 'virtio-mem') after it was realized"),
    ("qom-set", {"path": "vmem0", "property": "memdev", "value": "/objects/mem2"},
     "GenericError", "Attempt to set link property 'memdev' on device '(null)' "
     "(type 'virtio-mem') after it was realized"),
    ("qom-set", {"path": "dimm0", "property": "addr", "value": 0}, "GenericError",
     "Attempt to set property 'addr' on device 'dimm0' (type 'pc-dimm') after it was realized"),
    ("qom-set", {"path": "mem0", "property": "size", "value": GiB}, "GenericError",
     "cannot change property size of memory-backend-ram "),
    ("qom-set", {"path": "mem0", "property": "share", "value": True}, "GenericError",
     "cannot change property value"),
    ("qom-set", {"path": VMEM, "property": "max-size", "value": 1}, "GenericError",
     "Property 'virtio-mem-pci.max-size' not found"),
    ("qom-get", {"path": "/machine/peripheral/nope", "property": "size"}, "DeviceNotFound",
     "Device '/machine/peripheral/nope' not found"),
    ("qom-get", {"path": "nope", "property": "size"}, "DeviceNotFound",
     "Device 'nope' not found"),
    ("qom-get", {"path": "", "property": "size"}, "DeviceNotFound", "Device '' not found"),
    ("qom-get", {"path": "/objects/", "property": "size"}, "DeviceNotFound",
     "Device '/objects/' not found"),
    ("object-del", {"id": "mem0"}, "GenericError",
     "object 'mem0' can't be deleted: it is used by device 'vmem0'"),
    ("object-del", {"id": "nope"}, "GenericError", "object 'nope' not found"),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "mem0", "size": GiB}, "GenericError",
     "attempt to add duplicate property 'mem0' to object"),
    ("object-add", {"qom-type": "memory-backend-rom", "id": "x", "size": GiB}, "GenericError",
     "Parameter 'qom-type' does not accept value 'memory-backend-rom'"),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "x"}, "GenericError",
     "Parameter 'size' is missing"),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "x", "size": GiB, "mem-path": "/"},
     "GenericError", "Parameter 'mem-path' is unexpected"),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "1x", "size": GiB}, "GenericError",
     "Parameter 'id' expects an identifier"),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "x", "size": 0}, "GenericError",
     "object-add 'x': property 'size' of x must not be zero"),
    ("device_add", {"driver": "virtio-mem", "id": "vmem0", "memdev": "mem2"}, "GenericError",
     "Duplicate device ID 'vmem0'"),
    ("device_add", {"driver": "virtio-mem", "id": "v1", "memdev": "nope"}, "GenericError",
     "Property 'virtio-mem.memdev' can't find value 'nope'"),
    ("device_add", {"driver": "virtio-mem", "id": "v1", "memdev": "mem1"}, "GenericError",
     "virtio-mem 'v1': 'memdev' property specifies a busy memdev: mem1"),
    ("device_add", {"driver": "virtio-mem", "id": "v1", "memdev": "mem0"}, "GenericError",
     "not enough space, currently 0x240000000 in use of total space for memory devices "
     "0x300000000"),
    ("device_add", {"driver": "virtio-mem", "id": "v1", "memdev": "mem2", "block-size": "3M"},
     "GenericError", "'block-size' property has to be a power of two"),
    ("device_add", {"driver": "virtio-mem", "id": "v1", "memdev": "mem2",
                    "requested-size": "3M"}, "GenericError",
     "virtio-mem 'v1': 'requested-size' property has to be multiples of 'block-size' (0x200000)"),
    ("device_add", {"driver": "virtio-mem", "id": "v1", "memdev": "mem2", "bogus": 1},
     "GenericError", "device_add 'v1': unknown parameter 'bogus'"),
    ("device_add", {"driver": "virtio-mem", "id": "v1", "memdev": "mem2", "node": [1]},
     "GenericError", "device_add: parameter 'node' expects a string, a number or a boolean"),
    ("device_add", {"driver": "virtio-gpu", "id": "v1"}, "GenericError",
     "device_add 'v1': unsupported device 'virtio-gpu'"),
    ("device_add", {"driver": "virtio-mem", "id": "a/b", "memdev": "mem2"}, "GenericError",
     "Parameter 'id' expects an identifier"),
    ("device_add", {"id": "v1"}, "GenericError", "Parameter 'driver' is missing"),
    ("device_add", {"driver": "pc-dimm", "id": "d1", "memdev": "mem2", "addr": 4096},
     "GenericError", "address must be aligned to"),
    ("device_del", {"id": "vmem0"}, "GenericError",
     "virtio-mem device cannot get unplugged while some of its memory is still plugged"),
    ("device_del", {"id": "nope"}, "DeviceNotFound", "Device 'nope' not found"),
    ("device_del", {"id": "/objects/mem0"}, "DeviceNotFound", "Device '/objects/mem0' not found"),
    ("device_del", {}, "GenericError", "Parameter 'id' is missing"),
    ("x-query-memslots", {"device": "vmem0"}, "GenericError", "Parameter 'device' is unexpected"),
]  # fmt: skip

#: Bytes only a raw client sends: (input, error desc prefix; None: the client is dropped).
RAW_BAD_INPUTS: list[tuple[bytes, str | None]] = [
    (b'{"execute": }', "JSON parse error"),
    (b"{'execute': 'query-status'}", "JSON parse error"),
    (b'{"execute": "query-status",}', "JSON parse error"),
    (b'{"execute": "query-status", "id": NaN}', "JSON parse error"),
    (b'{"execute": "query-status", "execute": "quit"}', "JSON parse error, duplicate key"),
    (b'{"execute": "query-\xff"}', "JSON parse error"),
    (b"]", "JSON parse error"),
    (b"garbage ", "JSON parse error"),
    (b"42 ", "QMP input must be a JSON object"),
    (b'"execute"', "QMP input must be a JSON object"),
    (b'[{"execute": "query-status"}]', "QMP input must be a JSON object"),
    (b"{}", "QMP input lacks member 'execute'"),
    (b'{"id": 3}', "QMP input lacks member 'execute'"),
    (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "query-status", "arguments": []}', "QMP input member 'arguments' must be"),
    (b'{"execute": "query-status", "extra": 1}', "QMP input member 'extra' is unexpected"),
    (b'{"exec-oob": "query-status"}', "QMP input member 'exec-oob' is unexpected"),
    (b'{"execute": "device_del", "arguments": {"id": null}}', "Invalid parameter type for 'id'"),
    (b'{"execute": "qom-set", "arguments": {"path": "vmem0", "property": "requested-size", '
     b'"value": 1e30}}', "Parameter 'requested-size' expects uint64"),
    (b'{"execute": "quit"', None),  # then 70 KiB of padding: oversized, dropped
]  # fmt: skip


def test_bad_inputs_leave_machine_unchanged_and_server_serving() -> None:
    assert len(QMP_BAD_INPUTS) + len(RAW_BAD_INPUTS) >= 30

    async def main() -> None:
        with make_machine() as m:
            drive_to(m.virtio_mem("vmem0"), 3 * GiB)
            before = snapshot(m)
            runtime = FakeRuntime(m)
            async with (
                serving(m, runtime=runtime) as (_, path),
                qmp_client(path, "bystander") as bystander,
            ):
                async with qmp_client(path, "bad") as qmp:
                    for command, args, cls, desc in QMP_BAD_INPUTS:
                        got = await error_of(qmp, command, args)
                        assert got[0] == cls, (command, args, got)
                        assert got[1].startswith(desc), (command, args, got)
                raw = await RawClient.open(path)
                for data, raw_desc in RAW_BAD_INPUTS:
                    if raw_desc is None:
                        await raw.send(data + b" " * 70 * 1024)
                        reply = await raw.recv()
                        assert reply["error"]["class"] == "GenericError"
                        assert await raw.closed_by_server()
                        await raw.close()
                        continue
                    await raw.send(data + b"\n")
                    reply = await raw.recv()
                    assert reply["error"]["class"] == "GenericError", (data, reply)
                    assert reply["error"]["desc"].startswith(raw_desc), (data, reply)
                # Before negotiation, every command is refused alike.
                early = await RawClient.open(path, negotiate=False)
                reply = await early.execute({"execute": "quit", "id": 1})
                assert reply["error"]["class"] == "CommandNotFound"
                await early.close()
                assert await bystander.execute("query-status") == {
                    "status": "running",
                    "singlestep": False,
                    "running": True,
                }
            assert runtime.quits == 0
            assert snapshot(m) == before

    run(main())


def test_object_and_device_hotplug_round_trip() -> None:
    clock = ManualClock()

    async def main() -> None:
        with make_machine() as m:
            added: list[str | None] = []
            removed: list[str] = []
            async with serving(m, clock=clock) as (monitor, path), qmp_client(path) as qmp:
                monitor.device_added.append(lambda dev: added.append(dev.id))
                monitor.device_removed.append(removed.append)
                await qmp.execute(
                    "object-add",
                    {"qom-type": "memory-backend-memfd", "id": "mem3", "size": 2 * GiB},
                )
                assert await qmp.execute("qom-get", {"path": "mem3", "property": "share"}) is True
                await qmp.execute(
                    "device_add",
                    {
                        "driver": "virtio-mem-pci",
                        "id": "vmem1",
                        "memdev": "mem3",
                        "dynamic-memslots": True,
                        "requested-size": "1G",
                    },
                )
                assert added == ["vmem1"]
                # Two virtio-mem devices now: the partial path is ambiguous.
                cls, desc = await error_of(
                    qmp, "qom-get", {"path": "virtio-backend", "property": "size"}
                )
                assert (cls, desc) == ("DeviceNotFound", "Device 'virtio-backend' not found")
                devices = await qmp.execute("query-memory-devices")
                assert [d["data"].get("id") for d in devices] == ["vmem0", "dimm0", "vmem1"]
                with qmp.listener(("MEMORY_DEVICE_SIZE_CHANGE", "DEVICE_DELETED")) as events:
                    dev = m.virtio_mem("vmem1")
                    drive_to(dev, GiB)
                    ev = await next_event(events, 2)
                    assert ev["data"] == {
                        "id": "vmem1",
                        "size": GiB,
                        "qom-path": "/machine/peripheral/vmem1",
                    }
                    cls, desc = await error_of(qmp, "device_del", {"id": "vmem1"})
                    assert desc.endswith("some of its memory is still plugged")
                    drive_to(dev, 0)
                    clock.advance(1.0)  # the size change was held until the period ended
                    await next_event(events, 2)
                    # Requested but not plugged yet (no guest): still refused.
                    await qmp.execute(
                        "qom-set", {"path": "vmem1", "property": "requested-size", "value": 2 * MiB}
                    )
                    cls, desc = await error_of(qmp, "device_del", {"id": "vmem1"})
                    assert desc.endswith("while 'requested-size' != '0'")
                    await qmp.execute(
                        "qom-set", {"path": "vmem1", "property": "requested-size", "value": 0}
                    )
                    assert (
                        await qmp.execute("device_del", {"id": "/machine/peripheral/vmem1"}) == {}
                    )
                    deleted = [await next_event(events, 2) for _ in range(2)]
                    assert [e["data"] for e in deleted] == [
                        {"path": "/machine/peripheral/vmem1/virtio-backend"},
                        {"device": "vmem1", "path": "/machine/peripheral/vmem1"},
                    ]
                    assert removed == ["vmem1"] and "vmem1" not in m.devices
                    await qmp.execute("object-del", {"id": "mem3"})
                    assert "mem3" not in m.backends
                    # pc-dimm hotplug: hotplugged, one DEVICE_DELETED.
                    await qmp.execute(
                        "device_add", {"driver": "pc-dimm", "id": "d1", "memdev": "mem2"}
                    )
                    dimms = [
                        d
                        for d in await qmp.execute("query-memory-devices")
                        if d["data"].get("id") == "d1"
                    ]
                    assert dimms[0]["data"]["hotplugged"] is True and dimms[0]["data"]["slot"] == 1
                    await qmp.execute("device_del", {"id": "d1"})
                    ev = await next_event(events, 2)
                    assert ev["event"] == "DEVICE_DELETED"
                    assert ev["data"] == {"device": "d1", "path": "/machine/peripheral/d1"}
                    assert m.backends["mem2"].used_by is None

    run(main())


def test_size_events_stop_after_device_del() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m, rate=0.0) as (monitor, path), qmp_client(path) as qmp:
                await qmp.execute(
                    "device_add", {"driver": "virtio-mem", "id": "v2", "memdev": "mem2"}
                )
                dev = m.virtio_mem("v2")
                assert any(monitor._size_changed == cb for cb in dev.size_change_listeners)
                await qmp.execute("device_del", {"id": "v2"})
                assert dev.size_change_listeners == []

    run(main())


def test_anonymous_devices_get_peripheral_anon_paths() -> None:
    async def main() -> None:
        with make_machine() as m:
            async with serving(m, rate=0.0) as (_, path), qmp_client(path) as qmp:
                await qmp.execute("device_add", {"driver": "virtio-mem", "memdev": "mem2"})
                devices = await qmp.execute("query-memory-devices")
                anon = [d for d in devices if "id" not in d["data"]]
                assert len(anon) == 1
                apath = "/machine/peripheral-anon/device[0]"
                assert await qmp.execute("qom-get", {"path": apath, "property": "memdev"}) == (
                    "/objects/mem2"
                )
                with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as events:
                    drive_to(next(d for d in m.virtio_mem_devices if d.id is None), 2 * MiB)
                    ev = await next_event(events, 2)
                assert ev["data"] == {"size": 2 * MiB, "qom-path": apath}
                memslots = await qmp.execute("x-query-memslots")
                assert apath in {s["device"] for s in memslots}
                # deleted by its QOM path, with QEMU's refusals first
                with pytest.raises(ExecuteError, match="still plugged"):
                    await qmp.execute("device_del", {"id": apath})
                drive_to(next(d for d in m.virtio_mem_devices if d.id is None), 0)
                await qmp.execute(
                    "qom-set", {"path": apath, "property": "requested-size", "value": 0}
                )
                with qmp.listener("DEVICE_DELETED") as deleted:
                    await qmp.execute("device_del", {"id": apath})
                    ev = await next_event(deleted, 2)
                assert ev["data"] == {"path": apath}
                assert all("id" in d["data"] for d in await qmp.execute("query-memory-devices"))
                await qmp.execute("object-del", {"id": "mem2"})  # free again

    run(main())


def test_quit_status_and_introspection() -> None:
    async def main() -> None:
        with make_machine() as m:
            runtime = FakeRuntime(m)
            async with serving(m, runtime=runtime) as (_, path), qmp_client(path) as qmp:
                runtime.state = "paused"
                assert await qmp.execute("query-status") == {
                    "status": "paused",
                    "singlestep": False,
                    "running": False,
                }
                version = await qmp.execute("query-version")
                assert version["qemu"] == {"micro": 0, "minor": 2, "major": 8}
                names = {c["name"] for c in await qmp.execute("query-commands")}
                assert {"qmp_capabilities", "qom-set", "x-query-memslots", "quit"} <= names
                meta = await qmp.execute("x-query-kernel-metadata")
                assert meta["model-bytes"] == m.kvm.predicted_metadata_bytes()
                assert meta["real"] is False and "kernel-memory" not in meta
                assert {d["device"] for d in meta["devices"]} == {"vmem0", "dimm0"}
                with qmp.listener("SHUTDOWN") as events:
                    assert await qmp.execute("quit") == {}
                    ev = await next_event(events, 2)
                assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
                assert runtime.quits == 1

    run(main())


class FakeVhostProvider:
    """A provider for a vhost-user device driver, as the runtime will register."""

    def __init__(self) -> None:
        self.devices: dict[str, dict[str, Any]] = {}

    def drivers(self) -> list[str]:
        return ["vhost-user-fs-pci"]

    def add_device(self, args: dict[str, Any]) -> None:
        self.devices[args["id"]] = args

    def has_device(self, dev_id: str) -> bool:
        return dev_id in self.devices

    def remove_device(self, dev_id: str) -> None:
        del self.devices[dev_id]


def test_device_provider_hook() -> None:
    async def main() -> None:
        with make_machine() as m:
            provider = FakeVhostProvider()
            async with serving(m) as (monitor, path), qmp_client(path) as qmp:
                monitor.add_device_provider(provider)
                args = {"driver": "vhost-user-fs-pci", "id": "fs0", "chardev": "c0", "tag": "t"}
                assert await qmp.execute("device_add", args) == {}
                assert provider.devices["fs0"] == args
                with qmp.listener("DEVICE_DELETED") as events:
                    await qmp.execute("device_del", {"id": "fs0"})
                    ev = await next_event(events, 2)
                assert ev["data"] == {"device": "fs0", "path": "/machine/peripheral/fs0"}
                assert provider.devices == {}

    run(main())


def test_machine_without_device_memory() -> None:
    async def main() -> None:
        with Machine(parse_machine_config("1G", accel="sim"), vm=KvmModel()) as m:
            async with serving(m) as (_, path), qmp_client(path) as qmp:
                assert await qmp.execute("query-memory-devices") == []
                budget = await qmp.execute("x-query-memslot-budget")
                assert "device-memory" not in budget
                summary = await qmp.execute("query-memory-size-summary")
                assert summary == {"base-memory": 1 << 30, "plugged-memory": 0}
                text = json.dumps(await qmp.execute("x-query-memslots"))
                assert text == "[]"

    run(main())


def test_memslots_held_by_vhost_back_ends() -> None:
    """A kernel back-end maps every section; a vhost-user one only fd-backed memory."""

    async def main() -> None:
        config = parse_machine_config(
            "4G,maxmem=12G",
            ["memory-backend-memfd,id=mem0,size=4G,reserve=off"],
            ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"],
            accel="sim",
        )
        consumers = [VhostModel("net0", 600), VhostModel("fs0", 600, kind="user")]
        with Machine(config, vm=KvmModel(), vhost=list(consumers)) as m:
            drive_to(m.virtio_mem("vmem0"), GiB)
            async with serving(m) as (_, path), qmp_client(path) as qmp:
                memslots = await qmp.execute("x-query-memslots")
                budget = await qmp.execute("x-query-memslot-budget")
        assert [s["vhost"] for s in memslots][:2] == [["net0", "fs0"], []]
        assert [c["name"] for c in budget["consumers"]] == ["kvm", "net0", "fs0"]
        fs0 = budget["consumers"][2]
        # Boot RAM is anonymous: the vhost-user back-end holds only the plugged memslot.
        assert (fs0["max-memslots"], fs0["used-memslots"], fs0["free-memslots"]) == (600, 1, 599)

    run(main())


def test_cont_system_reset_and_guest_access_without_a_guest() -> None:
    async def main() -> None:
        with make_machine() as m:
            dev = m.virtio_mem("vmem0")
            drive_to(dev, GiB)
            runtime = FakeRuntime(m)
            async with serving(m, runtime=runtime) as (monitor, path), qmp_client(path) as qmp:
                with qmp.listener("RESUME") as events:
                    assert await qmp.execute("cont") == {}  # running: nothing to do
                    with pytest.raises(asyncio.TimeoutError):
                        await next_event(events, 0.2)
                runtime.state = "internal-error"
                assert await error_of(qmp, "cont") == (
                    "GenericError",
                    "Resetting the Virtual Machine is required",
                )
                assert await qmp.execute("stop") == {}  # as QEMU: a VM not running keeps its state
                assert (await qmp.execute("query-status"))["status"] == "internal-error"
                monitor.migrating = lambda: True
                assert await error_of(qmp, "system_reset") == (
                    "GenericError",
                    "system_reset not allowed while migrating",
                )
                monitor.migrating = lambda: False
                with qmp.listener("RESET") as events:
                    assert await qmp.execute("system_reset") == {}
                    ev = await next_event(events, 2)
                assert ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
                assert runtime.resets == 1 and dev.size == 0
                assert (await qmp.execute("query-status"))["status"] == "prelaunch"
                with qmp.listener("RESUME") as events:
                    assert await qmp.execute("cont") == {}
                    await next_event(events, 2)
                assert (await qmp.execute("query-status"))["running"] is True
                args = {"address": dev.addr, "value": 256}
                assert (await error_of(qmp, "x-guest-memory-access", args))[1].startswith(
                    "Parameter 'value' expects a byte"
                )
                got = await error_of(qmp, "x-guest-memory-access", {"address": dev.addr})
                assert got == ("GenericError", "the machine runs without a guest (-guest none)")

    run(main())


def test_object_add_file_backend_never_pads_an_existing_file(tmp_path: Path) -> None:
    """QMP object-add follows QEMU: a non-empty file smaller than size is refused untouched
    (it was padded with NULs to 8 MiB before); a device node is refused before it is opened."""
    small = tmp_path / "small"
    small.write_bytes(b"\x01" * 1500)

    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path), qmp_client(path) as qmp:
                args = {"qom-type": "memory-backend-file", "id": "f", "size": 8 * MiB}
                got = await error_of(qmp, "object-add", {**args, "mem-path": str(small)})
                assert got == (
                    "GenericError",
                    "backing store size 0x5dc does not match 'size' option 0x800000: memory "
                    f"backend 'f' (8 MiB), mem-path '{small}' is left as it is",
                )
                got = await error_of(qmp, "object-add", {**args, "mem-path": "/dev/zero"})
                assert "mem-path '/dev/zero' is a character device" in got[1]
                assert "f" not in m.backends

    run(main())
    assert small.read_bytes() == b"\x01" * 1500


@requires_qsd
def test_vhost_user_events_survive_device_del_and_add_cycles(tmp_path: Path) -> None:
    """Every back-end a device_add creates gets the monitor's listener, and a removed one is
    forgotten: over 200 device_del/device_add cycles against qemu-storage-daemon each removal
    says "closed" and each reconnect "connected"; then a killed back-end is an event too.
    (The monitor kept back-ends as id(obj): a new one with a recycled id got no listener.)"""
    cycles = 200

    async def main(qsd: QemuStorageDaemon) -> None:
        config = parse_machine_config(
            "1G,maxmem=9G",
            ["memory-backend-memfd,id=mem0,size=8G,share=on,reserve=off"],
            ["virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G"],
            accel="sim",
            chardevs=[f"socket,id=blk0,path={qsd.socket_path}"],
        )
        add = {"driver": "vhost-user-blk-pci", "id": "disk0", "chardev": "blk0"}
        add["memslot-accounting"] = "precise"
        with Machine(config, vm=KvmModel()) as m:
            async with serving(m) as (monitor, path), qmp_client(path) as qmp:
                monitor.add_device_provider(VhostUserProvider(m))
                with qmp.listener("X_VHOST_USER_STATE") as states:
                    for _ in range(cycles):
                        await qmp.execute("device_add", add)
                        await qmp.execute("x-vhost-user-reconnect", {"id": "disk0"})
                        ev = await next_event(states, 5)
                        assert ev["data"] == {"id": "disk0", "state": "connected"}
                        await qmp.execute("device_del", {"id": "disk0"})
                        ev = await next_event(states, 5)
                        assert ev["data"] == {"id": "disk0", "state": "closed"}
                    await qmp.execute("device_add", add)
                    qsd.kill()
                    drive_to(m.virtio_mem("vmem0"), GiB)  # a table change finds it gone
                    lost = await next_event(states, 5)
                    assert lost["data"]["state"] == "disconnected"
                    assert lost["data"]["reason"]
                    qsd.start()
                    await qmp.execute("x-vhost-user-reconnect", {"id": "disk0"})
                    back = await next_event(states, 5)
                    # "connected" does not repeat the reason of the disconnection before it
                    assert back["data"] == {"id": "disk0", "state": "connected"}
                # removed back-ends keep no listener of the monitor (nothing to leak)
                assert len(monitor._watched_vhost) == 1

    with QemuStorageDaemon(tmp_path) as qsd:
        run(main(qsd))


def test_a_back_end_that_hangs_up_on_an_idle_machine_is_an_event(tmp_path: Path) -> None:
    """The loop watches every connected back-end's socket: a hang-up is reported at once, not
    at the next memory-table change, on each new connection after a reconnect; a removed
    back-end's connection is no longer watched."""
    fake = FakeBackend(str(tmp_path / "fake.sock"))
    config = parse_machine_config(
        "1G,maxmem=9G",
        ["memory-backend-memfd,id=mem0,size=8G,share=on,reserve=off"],
        [
            "vhost-user-blk-pci,id=disk0,chardev=blk0,memslot-accounting=precise",
            "virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G",
        ],
        accel="sim",
        chardevs=[f"socket,id=blk0,path={fake.path}"],
    )

    async def main() -> None:
        with Machine(config, vm=KvmModel()) as m:
            async with serving(m) as (monitor, path), qmp_client(path) as qmp:
                monitor.add_device_provider(VhostUserProvider(m))
                with qmp.listener("X_VHOST_USER_STATE") as states:
                    for _ in range(3):
                        fake.hang_up()
                        lost = await next_event(states, 5)
                        assert lost["data"]["state"] == "disconnected"
                        await qmp.execute("x-vhost-user-reconnect", {"id": "disk0"})
                        back = await next_event(states, 5)
                        assert back["data"] == {"id": "disk0", "state": "connected"}
                    assert len(monitor._watched_connections) == 1
                    await qmp.execute("device_del", {"id": "disk0"})
                    closed = await next_event(states, 5)
                    assert closed["data"] == {"id": "disk0", "state": "closed"}
                assert not monitor._watched_connections
                assert fake.connections == 4

    try:
        run(main())
    finally:
        fake.close()


def test_removed_anonymous_devices_are_forgotten_and_their_paths_reused() -> None:
    """Nothing keeps a removed anonymous device (the monitor's path table held each one,
    574 KiB per cycle of a 1 TiB virtio-mem), and QEMU reuses the lowest free device[N]."""

    def anonymous(m: Machine) -> list[weakref.ref[MemoryDevice]]:
        return [weakref.ref(d) for d in m.memory_devices if d.id is None]

    async def main() -> None:
        with make_machine() as m:
            async with serving(m) as (_, path), qmp_client(path) as qmp:
                for i in (3, 4):
                    await qmp.execute(
                        "object-add",
                        {"qom-type": "memory-backend-ram", "id": f"m{i}", "size": GiB},
                    )
                anon = "/machine/peripheral-anon/device[{}]"
                gone: list[weakref.ref[MemoryDevice]] = []
                for _ in range(3):
                    await qmp.execute("device_add", {"driver": "virtio-mem", "memdev": "m3"})
                    gone += anonymous(m)
                    await qmp.execute("device_del", {"id": anon.format(0)})
                await qmp.execute("device_add", {"driver": "virtio-mem", "memdev": "m3"})
                await qmp.execute("device_add", {"driver": "virtio-mem", "memdev": "m4"})
                memdev = {"property": "memdev"}
                assert await qmp.execute("qom-get", {"path": anon.format(1), **memdev}) == (
                    "/objects/m4"
                )
                await qmp.execute("device_del", {"id": anon.format(0)})
                await qmp.execute("device_add", {"driver": "virtio-mem", "memdev": "m3"})
                # the lowest free index again, beside the device that kept device[1]
                assert await qmp.execute("qom-get", {"path": anon.format(0), **memdev}) == (
                    "/objects/m3"
                )
                gc.collect()
                assert [ref() for ref in gone] == [None, None, None]


def test_with_a_runner_commands_run_in_its_worker_and_events_follow_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``memslots run``'s monitor: commands on the machine run in the runner's worker holding
    the machine lock; the events they cause still come after their replies."""

    async def main() -> None:
        with make_machine() as m, socket_dir() as d:
            runner = MachineRunner()
            monitor = Monitor(FakeRuntime(m), QMPServer(), runner=runner)
            where: list[str] = []
            remove = m.remove_device

            def watched(dev_id: str) -> None:
                where.append(threading.current_thread().name)
                remove(dev_id)

            monkeypatch.setattr(m, "remove_device", watched)
            path = f"{d}/qmp.sock"
            await monitor.server.start_unix(path)
            try:
                raw = await RawClient.open(path)
                await raw.send(b'{"execute": "device_del", "arguments": {"id": "dimm0"}}\n')
                lines = [json.loads(await raw.reader.readline()) for _ in range(2)]
                assert lines[0] == {"return": {}}
                assert lines[1]["event"] == "DEVICE_DELETED"
                assert lines[1]["data"] == {"device": "dimm0", "path": "/machine/peripheral/dimm0"}
                assert "dimm0" not in m.devices
                await raw.close()
            finally:
                await monitor.server.close()
                monitor.close()
                runner.stop()
            assert len(where) == 1 and where[0].startswith("machine")  # the worker's name

    run(main())
