"""Two ``memslots run`` processes, driven by the unmodified qemu.qmp: the acceptance runs on the
real kernel (a 1 TiB device with 4 GiB plugged and the vCPU writing), a destination with a real
vhost-user back-end that decides another layout, processes killed mid-stream, snapshots to a
file and back, and ``memslots migrate``. Every child is killed and reaped at the end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from backends import QemuStorageDaemon, memfd_mappings
from conftest import requires_kvm, requires_qsd
from kmem_support import memory_cgroup_of
from migration_support import (
    client,
    output,
    resize,
    socket_dir,
    spawned,
    until_migrated,
    until_status,
    until_transferred,
)
from qmp_support import Client

from memslots.host.kmem import locate_memory_cgroup
from memslots.sizes import GiB, MiB

PAGE = 4096
BIG = [
    "-m", "1G,maxmem=1025G",
    "-object", "memory-backend-ram,id=mem0,size=1T,reserve=off",
    "-device", "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
]  # fmt: skip
SMALL = [
    "-m", "1G,maxmem=9G",
    "-object", "memory-backend-ram,id=mem0,size=8G,reserve=off",
    "-device", "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
    "-accel", "sim",
]  # fmt: skip


async def memslots_holding_plugged(qmp: Client) -> tuple[list[int], list[int]]:
    """x-query-memslots: the indices mapped, and those holding plugged blocks."""
    slots: list[dict[str, Any]] = await qmp.execute("x-query-memslots")
    mapped = [s["index"] for s in slots if s["device"] == "vmem0" and s["mapped"]]
    holding = [s["index"] for s in slots if s["device"] == "vmem0" and s["plugged-blocks"]]
    return mapped, holding


async def quit_both(qs: Client, qd: Client) -> None:
    for qmp in (qs, qd):
        await qmp.execute("quit")


@requires_kvm
def test_acceptance_on_the_kernel_a_1t_device_with_4g_plugged_and_the_vcpu_writing() -> None:
    with socket_dir() as d:
        src_sock, dst_sock = f"{d}/src.sock", f"{d}/dst.sock"
        dst_args = [*BIG, "-accel", "kvm", "-incoming", f"unix:{d}/mig.sock", "-S"]
        with (
            spawned([*BIG, "-accel", "kvm"], src_sock) as src,
            spawned(dst_args, dst_sock) as dst,
        ):
            cgroups = [memory_cgroup_of(p.pid) for p in (src, dst)]

            async def go() -> dict[str, Any]:
                async with client(src_sock) as qs, client(dst_sock) as qd:
                    await resize(qs, 4 * GiB, timeout=120)
                    await qs.execute(
                        "x-guest-workload", {"id": "vmem0", "units": 64, "period": 0.02}
                    )
                    await qs.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
                    await asyncio.sleep(0.5)  # the vCPU writes before and while RAM flows
                    await qs.execute("migrate", {"uri": f"unix:{d}/mig.sock"})
                    info = await until_migrated(qs, timeout=300)
                    assert info["status"] == "completed", info
                    await until_status(qd, "paused")
                    # Byte for byte, and every pattern the source's guest wrote, from the
                    # destination's vCPU.
                    assert await qs.execute("x-query-ram-digest") == await qd.execute(
                        "x-query-ram-digest"
                    )
                    verdict = await qd.execute("x-guest-verify", {"id": "vmem0"})
                    assert verdict["violations"] == [] and verdict["checked"] > 64
                    assert await qs.execute("query-memory-devices") == await qd.execute(
                        "query-memory-devices"
                    )
                    mapped, holding = await memslots_holding_plugged(qd)
                    assert mapped == holding and len(holding) >= 1
                    meta = await qd.execute("x-query-kernel-metadata")
                    await qd.execute("cont")
                    await resize(qd, 6 * GiB, timeout=120)
                    await resize(qd, 2 * GiB, timeout=120)
                    mapped, holding = await memslots_holding_plugged(qd)
                    assert mapped == holding
                    verdict = await qd.execute("x-guest-verify", {"id": "vmem0"})
                    assert verdict["violations"] == []
                    await quit_both(qs, qd)
                    return {"info": info, "meta": meta}

            got = asyncio.run(go())
            assert src.wait(60) == 0 and dst.wait(60) == 0
        ram = got["info"]["ram"]
        resent = ram["x-resent-bytes"]
        assert (ram["normal"] + ram["duplicate"]) * PAGE - resent == 4 * GiB + 1 * GiB
        assert ram["transferred"] <= 1.05 * (4 * GiB + 1 * GiB) + resent
        kernel = got["meta"]["kernel-memory"]
        if kernel["source"] == "cgroup":
            # The destination maps what holds plugged memory, not the 1 TiB device.
            assert kernel["bytes"] < 64 * MiB, kernel
        location = locate_memory_cgroup()
        for cgroup in cgroups:
            if os.path.basename(cgroup).startswith("memslots-"):
                assert not os.path.exists(os.path.join(location.path, os.path.basename(cgroup)))


@requires_qsd
def test_a_destination_with_a_vhost_user_back_end_maps_its_own_layout(tmp_path: Path) -> None:
    """QEMU's decision beside a 32-slot back-end plugged first: one memslot for the device on
    the destination, where the source has many; the back-end maps what is plugged, and the
    memory is intact."""
    accel = "auto"  # the real kernel where there is one
    machine = [
        "-m", "1G,maxmem=65G",
        "-object", "memory-backend-memfd,id=mem0,size=64G,share=on,reserve=off",
        "-accel", accel,
    ]  # fmt: skip
    device = ["-device", "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"]
    with QemuStorageDaemon(tmp_path) as qsd, socket_dir() as d:
        vhost = [
            "-chardev", f"socket,id=blk0,path={qsd.socket_path}",
            "-device", "vhost-user-blk-pci,id=disk0,chardev=blk0",
        ]  # fmt: skip
        dst_args = [*machine, *vhost, *device, "-incoming", f"unix:{d}/mig.sock", "-S"]
        with (
            spawned([*machine, *device], f"{d}/src.sock") as src,
            spawned(dst_args, f"{d}/dst.sock") as dst,
        ):

            async def go() -> None:
                async with client(f"{d}/src.sock") as qs, client(f"{d}/dst.sock") as qd:
                    await resize(qs, 3 * GiB, timeout=120)
                    await qs.execute(
                        "x-guest-workload", {"id": "vmem0", "units": 16, "period": 0.02}
                    )
                    await qs.execute("migrate", {"uri": f"unix:{d}/mig.sock"})
                    assert (await until_migrated(qs, timeout=300))["status"] == "completed"
                    await until_status(qd, "paused")
                    assert await qs.execute("x-query-ram-digest") == await qd.execute(
                        "x-query-ram-digest"
                    )
                    assert (await qd.execute("x-guest-verify", {"id": "vmem0"}))["violations"] == []
                    src_slots = await qs.execute("x-query-memslots")
                    dst_slots = await qd.execute("x-query-memslots")
                    src_count = len([s for s in src_slots if s["device"] == "vmem0"])
                    dst_mem = [s for s in dst_slots if s["device"] == "vmem0"]
                    assert src_count > 1 and len(dst_mem) == 1
                    assert dst_mem[0]["mapped"] and dst_mem[0]["size"] == 64 * GiB
                    assert "disk0" in dst_mem[0]["vhost"]
                    # The back-end maps the device's memfd (and nothing of the source).
                    names = {m.path for m in memfd_mappings(qsd.memory_pid)}
                    assert any("mem0" in name for name in names)
                    await qd.execute("cont")
                    await resize(qd, 1 * GiB, timeout=120)
                    await quit_both(qs, qd)

            asyncio.run(go())
            assert src.wait(60) == 0 and dst.wait(60) == 0


def test_killed_destination_fails_the_migration_and_a_later_one_succeeds() -> None:
    with socket_dir() as d, spawned(SMALL, f"{d}/src.sock") as src:
        with spawned([*SMALL, "-incoming", f"unix:{d}/m1"], f"{d}/dst1.sock") as dst1:

            async def start() -> None:
                async with client(f"{d}/src.sock") as qs:
                    await resize(qs, 2 * GiB)
                    await qs.execute("migrate-set-parameters", {"max-bandwidth": 64 << 10})
                    await qs.execute("migrate", {"uri": f"unix:{d}/m1"})
                    await until_transferred(qs, 1 << 16)

            asyncio.run(start())
            dst1.send_signal(signal.SIGKILL)
            dst1.wait(30)

        async def after() -> dict[str, Any]:
            async with client(f"{d}/src.sock") as qs:
                info = await until_migrated(qs)
                assert (await qs.execute("query-status"))["status"] == "running"
                await resize(qs, 3 * GiB)
                await qs.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
                return info

        info = asyncio.run(after())
        assert info["status"] == "failed"
        assert "Unable to write to socket" in info["error-desc"], info
        # A later migration, with the command line client.
        with spawned([*SMALL, "-incoming", f"unix:{d}/m2"], f"{d}/dst2.sock") as dst2:
            done = subprocess.run(
                [sys.executable, "-m", "memslots.cli.main", "migrate", f"{d}/src.sock",
                 f"unix:{d}/m2", "--wait", "--json"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            final = json.loads(done.stdout)
            assert final["status"] == "completed" and final["ram"]["normal"] > 0

            async def check() -> None:
                async with client(f"{d}/dst2.sock") as qd:
                    await until_status(qd, "running")
                    assert (
                        await qd.execute("qom-get", {"path": "vmem0", "property": "size"})
                        == 3 * GiB
                    )
                    await qd.execute("quit")

            asyncio.run(check())
            assert dst2.wait(30) == 0
        src.send_signal(signal.SIGTERM)
        assert src.wait(30) == 0


@pytest.mark.parametrize("accel", ["sim", pytest.param("kvm", marks=requires_kvm)])
def test_killed_source_makes_the_destination_exit_with_a_clear_message(accel: str) -> None:
    machine = [*SMALL[:-1], accel]
    with (
        socket_dir() as d,
        spawned(machine, f"{d}/src.sock") as src,
        spawned([*machine, "-incoming", f"unix:{d}/m"], f"{d}/dst.sock") as dst,
    ):
        cgroup = os.path.basename(memory_cgroup_of(dst.pid))

        async def start() -> None:
            async with client(f"{d}/src.sock") as qs:
                await resize(qs, 2 * GiB)
                await qs.execute("migrate-set-parameters", {"max-bandwidth": 64 << 10})
                await qs.execute("migrate", {"uri": f"unix:{d}/m"})
                await until_transferred(qs, 1 << 16)

        asyncio.run(start())
        src.send_signal(signal.SIGKILL)
        assert dst.wait(30) == 1
        text = output(dst)
        assert "memslots: load of migration failed: migration stream ended early" in text
        assert not os.path.exists(f"{d}/dst.sock") and not os.path.exists(f"{d}/m")
        # Its VM and its memory cgroup went with it.
        if cgroup.startswith("memslots-"):
            assert not os.path.exists(os.path.join(locate_memory_cgroup().path, cgroup))


def test_snapshot_to_a_file_and_back_and_a_corrupt_one_is_refused() -> None:
    with socket_dir() as d:
        state = f"{d}/vm.state"
        with spawned(SMALL, f"{d}/src.sock") as src:

            async def save() -> dict[str, str]:
                async with client(f"{d}/src.sock") as qs:
                    await resize(qs, 2 * GiB)
                    await qs.execute("stop")
                    await qs.execute("migrate", {"uri": f"file:{state}"})
                    info = await until_migrated(qs)
                    assert info["status"] == "completed", info
                    assert (await qs.execute("query-status"))["status"] == "postmigrate"
                    digest: dict[str, str] = await qs.execute("x-query-ram-digest")
                    await qs.execute("quit")
                    return digest

            saved = asyncio.run(save())
            assert src.wait(30) == 0
        with spawned([*SMALL, "-incoming", f"file:{state}"], f"{d}/back.sock") as back:

            async def restore() -> None:
                async with client(f"{d}/back.sock") as qb:
                    await until_status(qb, "running")
                    assert await qb.execute("x-query-ram-digest") == saved
                    assert (await qb.execute("x-guest-verify", {"id": "vmem0"}))["violations"] == []
                    await resize(qb, 1 * GiB)
                    await qb.execute("quit")

            asyncio.run(restore())
            assert back.wait(30) == 0
        data = bytearray(Path(state).read_bytes())
        data[len(data) // 2] ^= 0x40
        Path(f"{d}/bad.state").write_bytes(data)
        proc = subprocess.run(
            [sys.executable, "-m", "memslots.cli.main", "run", *SMALL,
             "-incoming", f"file:{d}/bad.state", "-qmp", f"unix:{d}/bad.sock"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1
        assert "memslots: load of migration failed: corrupt migration stream:" in proc.stderr
        assert not os.path.exists(f"{d}/bad.sock")


@requires_qsd
def test_x_ignore_shared_hands_the_memory_to_the_destination_and_its_vhost_back_end(
    tmp_path: Path,
) -> None:
    """A local live update to a destination whose vhost-user back-end already mapped the
    destination's own memfd (the device maps its whole backend at plug): after the migration
    the destination and its back-end map the source's memfd, and no page of it was sent."""
    accel = "auto"  # the real kernel where there is one
    machine = [
        "-m", "1G,maxmem=9G",
        "-object", "memory-backend-memfd,id=mem0,size=8G,share=on",
        "-accel", accel,
    ]  # fmt: skip
    device = ["-device", "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=off"]
    with QemuStorageDaemon(tmp_path) as qsd, socket_dir() as d:
        vhost = [
            "-chardev", f"socket,id=blk0,path={qsd.socket_path}",
            "-device", "vhost-user-blk-pci,id=disk0,chardev=blk0",
        ]  # fmt: skip
        dst_args = [*machine, *vhost, *device, "-incoming", f"unix:{d}/mig.sock", "-S"]
        with (
            spawned([*machine, *device], f"{d}/src.sock") as src,
            spawned(dst_args, f"{d}/dst.sock") as dst,
        ):
            (theirs,) = {m.inode for m in memfd_mappings(src.pid)}
            before = {m.inode for m in memfd_mappings(qsd.memory_pid)}
            assert theirs not in before and before  # the back-end maps the destination's own

            async def go() -> dict[str, Any]:
                async with client(f"{d}/src.sock") as qs, client(f"{d}/dst.sock") as qd:
                    await resize(qs, 2 * GiB, timeout=120)
                    await qs.execute(
                        "migrate-set-capabilities",
                        {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
                    )
                    await qs.execute("migrate", {"uri": f"unix:{d}/mig.sock"})
                    info = await until_migrated(qs, timeout=300)
                    assert info["status"] == "completed", info
                    await until_status(qd, "paused")
                    assert await qs.execute("x-query-ram-digest") == await qd.execute(
                        "x-query-ram-digest"
                    )
                    assert {m.inode for m in memfd_mappings(dst.pid)} == {theirs}
                    assert {m.inode for m in memfd_mappings(qsd.memory_pid)} == {theirs}
                    await qd.execute("cont")
                    await resize(qd, 1 * GiB, timeout=120)
                    await quit_both(qs, qd)
                    return info

            info = asyncio.run(go())
            assert src.wait(60) == 0 and dst.wait(60) == 0
        ram = info["ram"]
        # Only boot RAM travelled.
        assert (ram["normal"] + ram["duplicate"]) * PAGE - ram["x-resent-bytes"] == 1 * GiB
