"""What goes wrong, and what then holds: a cancelled migration, a destination that dies, one
that refuses the state, a second ``migrate``; and the QMP refusals, with QEMU's texts.
Both machines are ``memslots run`` served in this process on the KVM model."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from migration_support import (
    VMEM,
    client,
    in_process,
    recording,
    resize,
    socket_dir,
    until_migrated,
    until_status,
)
from qemu.qmp import ExecuteError
from qmp_support import Client

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import MigrationError
from memslots.machine.machine import Machine
from memslots.monitor.metrics import Metrics
from memslots.sizes import GiB

#: A small device whose every 2 MiB unit the guest writes: 1 GiB plugged is 512 data pages.
SMALL = (
    "1G,maxmem=17G",
    ("memory-backend-ram,id=mem0,size=8G,reserve=off",),
    ("virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",),
)
#: Slow enough that a test acts while RAM flows (about 4 s for the small machine).
SLOW = 512 << 10


def vmem(machine: Machine) -> VirtioMem:
    return machine.virtio_mem("vmem0")


def state(machine: Machine) -> tuple[object, ...]:
    """The source's device state that no failed migration may change."""
    dev = vmem(machine)
    mapped = tuple(i for i, r in enumerate(dev.memslots) if r.mapped)
    return dev.size, dev.requested_size, bytes(dev.bitmap), mapped, dev.busy


async def slow(qmp: Client) -> None:
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": SLOW})


async def until_active(qmp: Client) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = await qmp.execute("query-migrate")
        if info["status"] == "active" and info["ram"]["transferred"] > 64 << 10:
            return info
        assert info["status"] in ("setup", "active"), info
        await asyncio.sleep(0.02)


def test_cancel_resumes_the_source_and_a_later_migration_succeeds() -> None:
    async def go() -> None:
        with socket_dir() as d:
            async with in_process(d, "src", SMALL) as src, client(src.sock) as qs:
                await resize(qs, 1 * GiB)
                before = state(src.runtime.machine)
                await qs.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]},
                )
                async with in_process(d, "dst", SMALL, incoming=f"unix:{d}/m1") as dst:
                    await slow(qs)
                    async with recording(qs) as events:
                        await qs.execute("migrate", {"uri": f"unix:{d}/m1"})
                        # query-migrate is answered while RAM flows, and progresses
                        first = await until_active(qs)
                        second = await until_active(qs)
                        assert second["ram"]["transferred"] >= first["ram"]["transferred"]
                        assert first["ram"]["remaining"] > 0
                        await qs.execute("migrate_cancel")
                        info = await until_migrated(qs)
                    assert info == {"status": "cancelled"}
                    assert events.statuses() == ["setup", "active", "cancelling", "cancelled"]
                    # The destination saw the stream end early and gave up.
                    error = await dst.wait()
                    assert isinstance(error, MigrationError)
                    assert str(error).startswith("load of migration failed: ")
                    assert "ended early" in str(error) or "cannot receive" in str(error)
                    assert vmem(dst.runtime.machine).size == 0
                assert (await qs.execute("query-status"))["status"] == "running"
                assert state(src.runtime.machine) == before
                assert not src.runtime.machine.kvm.dirty_logging
                # The guest still runs on the source: it resizes.
                await resize(qs, 2 * GiB)
                await qs.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
                async with in_process(d, "dst2", SMALL, incoming=f"unix:{d}/m2") as dst2:
                    await qs.execute("migrate", {"uri": f"unix:{d}/m2"})
                    assert (await until_migrated(qs))["status"] == "completed"
                    async with client(dst2.sock) as qd:
                        await until_status(qd, "running")
                        assert (await qd.execute("x-guest-verify", {"id": "vmem0"}))[
                            "violations"
                        ] == []
                        assert vmem(dst2.runtime.machine).size == 2 * GiB

    asyncio.run(go())


def test_a_destination_that_dies_fails_the_migration_and_the_source_goes_on() -> None:
    async def go() -> None:
        with socket_dir() as d:
            async with in_process(d, "src", SMALL) as src, client(src.sock) as qs:
                await resize(qs, 1 * GiB)
                before = state(src.runtime.machine)
                fds = set(os.listdir("/proc/self/fd"))
                async with in_process(d, "dst", SMALL, incoming=f"unix:{d}/m1") as dst:
                    await slow(qs)
                    await qs.execute("migrate", {"uri": f"unix:{d}/m1"})
                    await until_active(qs)
                    dst.runtime.quit()  # the destination goes away mid-stream
                    await dst.wait()
                    info = await until_migrated(qs)
                # Neither side keeps a file descriptor (socket, memory, VM) of the attempt.
                assert set(os.listdir("/proc/self/fd")) <= fds
                assert info["status"] == "failed"
                assert info["error-desc"].startswith("Unable to write to socket"), info
                assert (await qs.execute("query-status"))["status"] == "running"
                assert state(src.runtime.machine) == before
                await resize(qs, 3 * GiB)

    asyncio.run(go())


def test_a_refusing_destination_after_the_stop_makes_the_source_resume() -> None:
    """The destination refuses only at the end (it runs no guest, the stream carries one):
    the source had stopped its vCPUs for the switch-over, and runs again (RESUME)."""

    async def go() -> None:
        with socket_dir() as d:
            async with (
                in_process(d, "src", SMALL) as src,
                in_process(d, "dst", SMALL, incoming=f"unix:{d}/m", guest=False) as dst,
                client(src.sock) as qs,
            ):
                await resize(qs, 1 * GiB)
                before = state(src.runtime.machine)
                async with recording(qs) as events:
                    await qs.execute("migrate", {"uri": f"unix:{d}/m"})
                    info = await until_migrated(qs)
                    await until_status(qs, "running")
                assert info["status"] == "failed"
                assert info["error-desc"].startswith("the destination failed: Unknown savevm")
                assert events.names("STOP", "RESUME") == ["STOP", "RESUME"]
                assert state(src.runtime.machine) == before
                assert isinstance(await dst.wait(), MigrationError)

    asyncio.run(go())


@pytest.mark.parametrize(
    ("size", "device", "message"),
    [
        ("8G", "block-size=4M", "Property 'block-size' changed from 0x200000 to 0x400000"),
        (
            "8G",
            "memaddr=0x180000000",
            "Property 'memaddr' changed from 0x100000000 to 0x180000000",
        ),
        ("4G", "", "Property 'memdev' size changed from 0x200000000 to 0x100000000"),
    ],
)
def test_sanity_mismatch_gives_qemus_message_on_both_sides(
    size: str, device: str, message: str
) -> None:
    other = (
        "1G,maxmem=17G",
        (f"memory-backend-ram,id=mem0,size={size},reserve=off",),
        (f"virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on{',' if device else ''}{device}",),
    )

    async def go() -> None:
        with socket_dir() as d:
            async with (
                in_process(d, "src", SMALL) as src,
                in_process(d, "dst", other, incoming=f"unix:{d}/m") as dst,
                client(src.sock) as qs,
            ):
                await resize(qs, 1 * GiB)
                await qs.execute("migrate", {"uri": f"unix:{d}/m"})
                info = await until_migrated(qs)
                error = await dst.wait()
        assert info["status"] == "failed"
        assert message in info["error-desc"]
        assert isinstance(error, MigrationError)
        assert str(error) == f"load of migration failed: virtio-mem 'vmem0': {message}"
        m = dst.runtime.machine
        assert vmem(m).size == 0 and not any(r.mapped for r in vmem(m).memslots)

    asyncio.run(go())


def test_qmp_refusals_have_qemus_texts() -> None:
    async def go() -> None:
        with socket_dir() as d:
            async with (
                in_process(d, "src", SMALL) as src,
                in_process(d, "dst", SMALL, incoming="defer") as dst,
                client(src.sock) as qs,
                client(dst.sock) as qd,
            ):
                assert await qs.execute("query-migrate-parameters") == {
                    "downtime-limit": 300,
                    "max-bandwidth": 128 << 20,
                }
                assert await qs.execute("query-migrate-capabilities") == [
                    {"capability": "events", "state": False},
                    {"capability": "x-ignore-shared", "state": False},
                ]
                refusals: list[tuple[Client, str, dict[str, Any], str]] = [
                    (qs, "migrate", {"uri": "exec:cat"}, "exec: migration over exec"),
                    (qs, "migrate", {"uri": "foo:bar"}, "unknown migration protocol: foo:bar"),
                    (
                        qs,
                        "migrate-set-parameters",
                        {"downtime-limit": 2000001},
                        "Parameter 'downtime_limit' expects an integer in the range of 0 to "
                        "2000000 milliseconds",
                    ),
                    (
                        qs,
                        "migrate-set-capabilities",
                        {"capabilities": [{"capability": "xbzrle", "state": True}]},
                        "Parameter 'capabilities[0].capability' does not accept value 'xbzrle'",
                    ),
                    (
                        qs,
                        "migrate-incoming",
                        {"uri": "unix:/nowhere"},
                        "'-incoming' was not specified on the command line",
                    ),
                    (qd, "migrate", {"uri": f"unix:{d}/x"}, "Guest is waiting for an incoming"),
                ]
                for qmp, command, args, text in refusals:
                    with pytest.raises(ExecuteError) as info:
                        await qmp.execute(command, args)
                    assert str(info.value).startswith(text), (command, str(info.value))
                assert await qd.execute("query-migrate") == {}
                # -incoming defer: migrate-incoming says where, once; port 0 picks one.
                await qd.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
                with pytest.raises(ExecuteError, match="already been started"):
                    await qd.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
                listening = await qd.execute("query-migrate")
                (address,) = listening["socket-address"]
                assert address["type"] == "inet" and int(address["port"]) > 0
                await resize(qs, 1 * GiB)
                await slow(qs)
                await qs.execute("migrate", {"uri": f"tcp:127.0.0.1:{address['port']}"})
                hotplug: list[tuple[str, dict[str, Any]]] = [
                    ("device_add", {"driver": "pc-dimm", "id": "d1", "memdev": "mem1"}),
                    ("device_del", {"id": "vmem0"}),
                ]
                for command, args in hotplug:
                    with pytest.raises(
                        ExecuteError, match=f"{command} not allowed while migrating"
                    ):
                        await qs.execute(command, args)
                with pytest.raises(ExecuteError, match="There's a migration process"):
                    await qs.execute(
                        "migrate-set-capabilities",
                        {"capabilities": [{"capability": "events", "state": True}]},
                    )
                await qs.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
                assert (await until_migrated(qs))["status"] == "completed"
                await until_status(qd, "running")
                assert vmem(dst.runtime.machine).size == 1 * GiB

    asyncio.run(go())


def test_busy_while_migrating_and_the_request_travels() -> None:
    """Plug requests get BUSY during the migration (counted); ``requested-size`` set meanwhile
    travels, and the destination's guest retries on its timer where the source's left off."""

    async def go() -> None:
        with socket_dir() as d:
            async with (
                in_process(d, "src", SMALL) as src,
                in_process(d, "dst", SMALL, incoming=f"unix:{d}/m") as dst,
                client(src.sock) as qs,
            ):
                await resize(qs, 1 * GiB)
                await slow(qs)
                await qs.execute("migrate", {"uri": f"unix:{d}/m"})
                await until_active(qs)
                await qs.execute(
                    "qom-set", {"path": VMEM, "property": "requested-size", "value": 2 * GiB}
                )
                dev = vmem(src.runtime.machine)
                while not dev.requests[("plug", "busy")]:
                    await asyncio.sleep(0.02)
                assert dev.busy_answers == dev.requests[("plug", "busy")]
                assert dev.size == 1 * GiB
                text = Metrics(src.runtime.machine).exposition().decode()
                counter = 'memslots_virtio_mem_busy_answers_total{device="vmem0"}'
                assert f"{counter} {dev.busy_answers}" in text
                await qs.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
                assert (await until_migrated(qs))["status"] == "completed"
                async with client(dst.sock) as qd:
                    await until_status(qd, "running")
                    assert (
                        await qd.execute("qom-get", {"path": VMEM, "property": "requested-size"})
                        == 2 * GiB
                    )
                    assert await qd.execute("qom-get", {"path": VMEM, "property": "size"}) == GiB
                guest = dst.runtime.guest
                assert guest is not None
                driver = guest.guests["vmem0"]
                # BUSY armed Linux's retry timer (50 s) on the source; it travelled.
                assert driver.timer_due is not None
                assert 0 < driver.timer_due - dst.runtime.sched.now() <= 50

    asyncio.run(go())
