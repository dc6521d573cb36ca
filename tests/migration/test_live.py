"""Live migration between two ``memslots run`` served in this process, on the KVM model, driven
by the unmodified qemu.qmp: the commands, the fields, the events, the run states, the faults."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from migration_support import (
    client,
    in_process,
    recording,
    resize,
    socket_dir,
    until_migrated,
    until_status,
)
from qemu.qmp import ExecuteError

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.machine.machine import Machine
from memslots.sizes import GiB, MiB

PAGE = 4096


def vmem(machine: Machine) -> VirtioMem:
    return machine.virtio_mem("vmem0")


def mapped(machine: Machine) -> list[int]:
    return [i for i, r in enumerate(vmem(machine).memslots) if r.mapped]


def holding_plugged(machine: Machine) -> list[int]:
    dev = vmem(machine)
    per = dev.memslot_size // dev.block_size
    return [i for i in range(dev.nb_memslots) if dev.bitmap.count(1, i * per, (i + 1) * per)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_live_migration_moves_the_machine_and_its_guest() -> None:
    async def go() -> None:
        with socket_dir() as d:
            async with (
                in_process(d, "src") as src,
                in_process(d, "dst", incoming=f"unix:{d}/mig.sock", autostart=False) as dst,
                client(src.sock) as qs,
                client(dst.sock) as qd,
            ):
                assert await qs.execute("query-migrate") == {}
                assert (await qd.execute("query-status"))["status"] == "inmigrate"
                info = await qd.execute("query-migrate")
                assert info["status"] == "setup"
                assert info["socket-address"] == [{"type": "unix", "path": f"{d}/mig.sock"}]
                await resize(qs, 3 * GiB)
                await qs.execute("x-guest-workload", {"id": "vmem0", "units": 32, "period": 0.01})
                await qs.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]},
                )
                await qd.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]},
                )
                async with recording(qs) as src_events, recording(qd) as dst_events:
                    await qs.execute("migrate", {"uri": f"unix:{d}/mig.sock"})
                    with pytest.raises(ExecuteError, match="There's a migration process"):
                        await qs.execute("migrate", {"uri": f"unix:{d}/other.sock"})
                    info = await until_migrated(qs)
                    # -S: the destination waits, so both sides can be compared as migrated.
                    await until_status(qd, "paused")
                assert info["status"] == "completed", info
                assert src_events.statuses() == ["setup", "active", "completed"]
                passes = [
                    e["data"]["pass"] for e in src_events.seen if e["event"] == "MIGRATION_PASS"
                ]
                assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 3
                assert info["ram"]["dirty-sync-count"] == passes[-1]
                assert src_events.names("STOP", "RESUME") == ["STOP"]
                # The destination listened (setup) before its client asked for events.
                assert dst_events.statuses() == ["active", "completed"]
                assert dst_events.names("STOP", "RESUME") == []
                assert (await qs.execute("query-status"))["status"] == "postmigrate"
                assert not os.path.exists(f"{d}/mig.sock")
                m_src, m_dst = src.runtime.machine, dst.runtime.machine

                # The same devices, the same memory, byte for byte.
                assert await qs.execute("query-memory-devices") == await qd.execute(
                    "query-memory-devices"
                )
                assert await qs.execute("x-query-ram-digest") == await qd.execute(
                    "x-query-ram-digest"
                )
                assert mapped(m_dst) == holding_plugged(m_dst) == holding_plugged(m_src)
                assert not vmem(m_dst).busy and not vmem(m_src).busy
                assert not m_src.kvm.dirty_logging

                # Only the plugged memory and boot RAM travel, each page once plus re-sends.
                ram = info["ram"]
                plugged, boot = vmem(m_src).size, 512 * MiB
                resent = ram["x-resent-bytes"]
                assert ram["normal-bytes"] == ram["normal"] * PAGE
                # The first pass covers exactly boot RAM and the plugged blocks ...
                assert (ram["normal"] + ram["duplicate"]) * PAGE - resent == plugged + boot
                # ... and the bytes on the wire stay within the bound.
                assert ram["transferred"] <= 1.05 * (plugged + boot) + resent
                assert ram["total"] == boot + 1024 * GiB

                # The guest goes on where it stopped: its data is intact and it resizes.
                verdict = await qd.execute("x-guest-verify", {"id": "vmem0"})
                assert verdict["violations"] == [] and verdict["checked"] > 0
                assert verdict["workload-ticks"] > 0
                async with recording(qd) as dst_events:
                    await qd.execute("cont")
                assert dst_events.names("STOP", "RESUME") == ["RESUME"]
                await resize(qd, 1 * GiB)
                await resize(qd, 4 * GiB)
                assert mapped(m_dst) == holding_plugged(m_dst)
                verdict = await qd.execute("x-guest-verify", {"id": "vmem0"})
                assert verdict["violations"] == []
                with pytest.raises(ExecuteError, match="paused due to previous migration"):
                    await qs.execute("migrate", {"uri": f"unix:{d}/again.sock"})

    run(go())


def test_x_ignore_shared_hands_memory_over_and_its_downtime_does_not_grow() -> None:
    """A local live update: 16 GiB plugged in shared memfd memory, handed over by fd, against
    a copying migration of 1 GiB with the same guest workload, in the same run. The copied
    bytes during the downtime are compared (the benchmark compares the times)."""

    def machine(share: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        return (
            "512M,maxmem=1025G",
            (f"memory-backend-memfd,id=mem0,size=1T,share={share},reserve=off",),
            ("virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",),
        )

    async def migrate(plugged: int, shared: bool) -> tuple[dict[str, Any], int]:
        with socket_dir() as d:
            m = machine("on")
            async with (
                in_process(d, "src", m) as src,
                in_process(d, "dst", m, incoming=f"unix:{d}/mig.sock", autostart=False) as dst,
                client(src.sock) as qs,
                client(dst.sock) as qd,
            ):
                await resize(qs, plugged)
                await qs.execute("x-guest-workload", {"id": "vmem0", "units": 256, "period": 0.01})
                await asyncio.sleep(0.1)
                await qs.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "x-ignore-shared", "state": shared}]},
                )
                await qs.execute("migrate", {"uri": f"unix:{d}/mig.sock"})
                info = await until_migrated(qs)
                assert info["status"] == "completed", info
                await until_status(qd, "paused")
                assert await qs.execute("x-query-ram-digest") == await qd.execute(
                    "x-query-ram-digest"
                )
                assert (await qd.execute("x-guest-verify", {"id": "vmem0"}))["violations"] == []
                src_fd = vmem(src.runtime.machine).memdev
                dst_fd = vmem(dst.runtime.machine).memdev
                assert src_fd is not None and dst_fd is not None
                same = (
                    os.fstat(src_fd.memory.fd or -1).st_ino
                    == os.fstat(dst_fd.memory.fd or -1).st_ino
                )
                assert same is shared
                assert mapped(dst.runtime.machine) == holding_plugged(src.runtime.machine)
                return info, vmem(src.runtime.machine).size

    async def go() -> None:
        shared, plugged = await migrate(16 * GiB, True)
        copied, _ = await migrate(1 * GiB, False)
        ram = shared["ram"]
        # Not a page of the 16 GiB travelled: only boot RAM (and its re-sent pages).
        assert (ram["normal"] + ram["duplicate"]) * PAGE - ram["x-resent-bytes"] == 512 * MiB
        assert plugged == 16 * GiB
        # What the downtime carries does not grow with the 16 GiB: boot RAM's last dirty
        # pages, the rings and the device and guest states only.
        assert ram["downtime-bytes"] < 1 * MiB
        assert ram["transferred"] < copied["ram"]["transferred"]

    run(go())
