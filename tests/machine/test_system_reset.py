"""System reset as QEMU 8.2 does it: virtio-mem memory unplugged (memslots unmapped, memory
discarded), the guest's driver starting over on a fresh device; a device reset changes nothing."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qmp_support import WAIT, FakeRuntime, make_machine, qmp_client, serving, socket_dir

from memslots.devices.virtio_mem.wire import ReqType
from memslots.errors import InaccessibleMemoryError
from memslots.guest.inorder import drive_to
from memslots.host.memory import MemfdBackend
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.machine.vm import GuestVm
from memslots.monitor.runtime import MachineRuntime, serve
from memslots.options import QmpEndpoint, parse_machine_config
from memslots.sizes import GiB, MiB

MEMORY = "4G,slots=1,maxmem=12G"
OBJECTS = [
    "memory-backend-memfd,id=mem0,size=4G,reserve=off",
    "memory-backend-ram,id=mem1,size=1G",
]
DEVICES = [
    "virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G",
    "pc-dimm,id=dimm0,memdev=mem1",
]


def machine(requested: str = "0") -> Machine:
    devices = [DEVICES[0] + f",requested-size={requested}", DEVICES[1]]
    return Machine(parse_machine_config(MEMORY, OBJECTS, devices, accel="sim"), vm=KvmModel())


def test_system_reset_unplugs_unmaps_and_discards() -> None:
    with machine() as m:
        dev = m.virtio_mem("vmem0")
        memory = m.backends["mem0"].memory
        assert isinstance(memory, MemfdBackend)
        drive_to(dev, 2 * GiB + 512 * MiB)
        memory.write(0, b"plugged")
        memory.write(2 * GiB, b"plugged")
        assert [s.mapped for s in dev.memslot_map()] == [True, True, True, False]
        slots_before = m.kvm.used_memslots
        m.system_reset()
        assert dev.size == 0 and dev.nb_plugged_blocks == 0
        assert [s.mapped for s in dev.memslot_map()] == [False] * 4
        assert m.kvm.used_memslots == slots_before - 3
        assert memory.allocated_bytes() == 0  # given back to the host
        fd = memory.fd
        assert fd is not None
        assert os.pread(fd, 7, 0) == bytes(7) and os.pread(fd, 7, 2 * GiB) == bytes(7)
        with pytest.raises(InaccessibleMemoryError):  # and out of our reach again
            memory.read(0, 7)
        assert memory.protected_bytes == 4 * GiB
        # requested-size stays; the usable region shrinks to what it needs.
        assert dev.requested_size == 2 * GiB + 512 * MiB
        assert dev.usable_region_size == 2 * GiB + 768 * MiB
        # The DIMM is untouched.
        assert m.devices["dimm0"].get_plugged_size() == GiB


def test_device_reset_changes_nothing() -> None:
    with machine("1G") as m, GuestVm(m, use_memory=False) as gvm:
        gvm.settle()
        dev = m.virtio_mem("vmem0")
        before = (dev.size, bytes(dev.bitmap), [s.mapped for s in dev.memslot_map()])
        gvm.transports["vmem0"].reset()  # the driver writes status 0
        assert (dev.size, bytes(dev.bitmap), [s.mapped for s in dev.memslot_map()]) == before


def test_the_guest_driver_starts_over_on_a_fresh_device() -> None:
    with machine("1G") as m, GuestVm(m, use_memory=False) as gvm:
        gvm.settle()
        old = gvm.guests["vmem0"]
        dev = m.virtio_mem("vmem0")
        assert dev.size == GiB and old.log
        gvm.system_reset()
        new = gvm.guests["vmem0"]
        assert new is not old and old.stopped
        # The new driver probed a device with nothing plugged, so it plugs from scratch (no
        # UNPLUG_ALL first) up to the unchanged requested-size.
        assert new.plugged_size == 0 and new.log == []
        gvm.settle()
        assert dev.size == GiB
        assert [r.type for r in new.log][:1] == ["plug"]
        assert new.violations == [] and new.verify() == 0


def test_a_reset_that_cannot_unplug_leaves_the_new_driver_to_unplug_all() -> None:
    """While the device is busy (migration) QEMU's unplug-all fails silently; the rebooted
    guest finds memory plugged and asks for UNPLUG_ALL first, as Linux does."""
    with machine("1G") as m, GuestVm(m, use_memory=False) as gvm:
        gvm.settle()
        dev = m.virtio_mem("vmem0")
        dev.busy = True
        gvm.system_reset()
        assert dev.size == GiB
        gvm.settle()
        new = gvm.guests["vmem0"]
        assert [(r.type, r.response) for r in new.log] == [("unplug_all", "busy")]
        dev.busy = False
        gvm.settle(60)  # the driver's 50 s retry timer
        assert [r.type for r in new.log][:2] == ["unplug_all", "unplug_all"]
        assert dev.size == GiB  # and then plugged again


def test_qmp_system_reset_sends_reset() -> None:
    async def main() -> None:
        with make_machine() as m:
            runtime = FakeRuntime(m)
            dev = m.virtio_mem("vmem0")
            drive_to(dev, GiB)
            async with serving(m, runtime=runtime) as (_, path), qmp_client(path) as qmp:
                with qmp.listener("RESET") as events:
                    assert await qmp.execute("system_reset") == {}
                    event = await asyncio.wait_for(events.get(), WAIT)
                status = await qmp.execute("query-status")
        assert event["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        assert runtime.resets == 1 and dev.size == 0
        assert status["status"] == "running"

    asyncio.run(main())


async def _qom(qmp: QMPClient, prop: str) -> Any:
    return await qmp.execute("qom-get", {"path": "vmem0", "property": prop})


async def _size_becomes(qmp: QMPClient, size: int) -> None:
    async with asyncio.timeout(WAIT):  # a safety net: the guest gets there on its own
        while await _qom(qmp, "size") != size:
            await asyncio.sleep(0.01)


def test_memslots_run_resets_with_its_guest() -> None:
    """``memslots run``'s runtime: the reset goes through the guest VM, whose new driver plugs
    the requested size again on the emptied device."""
    config = parse_machine_config(MEMORY, OBJECTS, DEVICES, accel="sim")
    runtimes: list[MachineRuntime] = []

    async def main() -> None:
        with socket_dir() as d:
            path = f"{d}/qmp.sock"
            ready = asyncio.Event()

            def started(runtime: MachineRuntime) -> None:
                runtimes.append(runtime)
                ready.set()

            server = asyncio.create_task(
                serve(config, [QmpEndpoint(path=path)], ready=started, install_signals=False)
            )
            await asyncio.wait_for(ready.wait(), WAIT)
            async with qmp_client(path) as qmp:
                await qmp.execute(
                    "qom-set", {"path": "vmem0", "property": "requested-size", "value": GiB}
                )
                await _size_becomes(qmp, GiB)
                plugs: list[int] = []
                runtimes[0].machine.virtio_mem("vmem0").size_change_listeners.append(
                    lambda dev, size: plugs.append(size)
                )
                with qmp.listener("RESET") as events:
                    await qmp.execute("system_reset")
                    await asyncio.wait_for(events.get(), WAIT)
                await _size_becomes(qmp, GiB)
                assert plugs[0] == 0 and plugs[-1] == GiB  # emptied, then plugged again
                await qmp.execute("quit")
            await asyncio.wait_for(server, WAIT)

    asyncio.run(main())


def test_reset_requests_are_the_driver_s_own() -> None:
    """What the new driver sends is a fresh probe's stream: the same as the first boot's."""
    with machine("1G") as m, GuestVm(m, use_memory=False) as gvm:
        gvm.settle()
        first = [(r.type, r.offset, r.nb_blocks) for r in gvm.guests["vmem0"].log]
        gvm.system_reset()
        gvm.settle()
        again = [(r.type, r.offset, r.nb_blocks) for r in gvm.guests["vmem0"].log]
        assert again == first
        assert all(t == ReqType.PLUG.name.lower() for t, _, _ in again)
