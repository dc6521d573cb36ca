"""QMP ``x-query-guest``: the guest drivers of ``memslots run`` and the checks, from inside the
guest, of the memory they use (how ``bench/soak.py`` sees check failures)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from conftest import requires_kvm
from qemu.qmp import ExecuteError
from qmp_support import Client, socket_dir

from memslots.monitor import runtime
from memslots.options import QmpEndpoint, parse_machine_config
from memslots.sizes import GiB, MiB


async def _serve_and(accel: str, go: Any, *, guest: bool = True) -> None:
    """``memslots run`` in this loop with an 8 GiB virtio-mem device of 1 GiB memslots; runs
    ``go(machine, client)`` and quits."""
    config = parse_machine_config(
        "1G,maxmem=9G",
        ["memory-backend-memfd,id=mem0,size=8G,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G"],
        accel=accel,
    )
    with socket_dir() as d:
        path = f"{d}/qmp.sock"
        started: asyncio.Future[runtime.MachineRuntime] = asyncio.Future()
        serving = asyncio.create_task(
            runtime.serve(
                config,
                [QmpEndpoint(path=path)],
                guest=guest,
                ready=started.set_result,
                install_signals=False,
            )
        )
        machine = (await asyncio.wait_for(started, 30)).machine
        qmp = Client("test")
        await qmp.connect(path)
        try:
            await go(machine, qmp)
            await qmp.execute("quit")
        finally:
            with contextlib.suppress(EOFError):
                await qmp.disconnect()
            await asyncio.wait_for(serving, 30)


async def _reach(qmp: Client, size: int) -> None:
    await qmp.execute("qom-set", {"path": "vmem0", "property": "requested-size", "value": size})
    async with asyncio.timeout(30):
        while await qmp.execute("qom-get", {"path": "vmem0", "property": "size"}) != size:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("accel", ["sim", pytest.param("kvm", marks=requires_kvm)])
def test_verify_checks_used_memory_and_reports_what_was_lost(accel: str) -> None:
    """The guest checks all memory it uses on request: nothing fails while the machine keeps
    plugged memory intact; once the backend's memory is discarded behind the guest's back,
    every check fails and says so. On the kernel the checks run in the vCPU."""

    async def go(machine: Any, qmp: Client) -> None:
        await _reach(qmp, 2 * GiB)
        plain = await qmp.execute("x-query-guest")
        (driver,) = plain["drivers"]
        assert driver == {
            "device": "vmem0",
            "state": "running",
            "plugged-size": 2 * GiB,
            "violations": 0,
        }
        before = plain.get("vcpu")
        got = await qmp.execute("x-query-guest", {"verify": True})
        (driver,) = got["drivers"]
        assert driver["checked"] > 0 and driver["violations"] == 0
        if accel == "kvm":
            # the checks were guest loads: the vCPU ran them
            assert got["vcpu"]["commands"] > before["commands"]
            assert got["vcpu"]["mmio-exits"] == before["mmio-exits"]
        else:
            assert "vcpu" not in got
        machine.backends["mem0"].memory.discard(0, 2 * GiB)
        got = await qmp.execute("x-query-guest", {"verify": True})
        (lost,) = got["drivers"]
        assert lost["checked"] == driver["checked"]
        assert lost["violations"] == driver["checked"]
        assert "lost its contents" in lost["last-violation"]

    asyncio.run(_serve_and(accel, go))


def test_without_guest_it_is_an_error() -> None:
    async def go(machine: Any, qmp: Client) -> None:
        with pytest.raises(ExecuteError, match="without a guest"):
            await qmp.execute("x-query-guest", {"verify": True})

    asyncio.run(_serve_and("sim", go, guest=False))


def test_checked_counts_grow_with_the_memory_in_use() -> None:
    """More plugged memory, more sub-blocks in use: a verify checks each of them."""

    async def go(machine: Any, qmp: Client) -> None:
        counts = []
        for size in (0, 256 * MiB, 4 * GiB):
            await _reach(qmp, size)
            got = await qmp.execute("x-query-guest", {"verify": True})
            counts.append(got["drivers"][0]["checked"])
        assert counts[0] == 0 < counts[1] < counts[2]

    asyncio.run(_serve_and("sim", go))
