"""Experiment: a guest touches an unplugged block inside a mapped memslot, on the real kernel.

``memslots run``'s machinery runs in this process (its QMP server, the guest driver, the probe
vCPU at CPL3), and the real ``qemu.qmp`` client drives it over a Unix socket:

1. the guest plugs two blocks (``qom-set requested-size``), so memslot 0 (1 GiB) is mapped
   while its other blocks stay unplugged; the guest writes a marker into plugged block 0
   (``x-guest-memory-access``, from the vCPU);
2. the guest reads (then, after a reset, writes) a byte of unplugged block 3:
   ``event`` says whether ``X_GUEST_MEMORY_FAULT`` came for that address and access,
   ``stopped`` whether ``query-status`` then says ``internal-error`` and not running, and
   ``rss_growth_bytes`` is the growth across the access of the backend's RSS: the ``Rss`` the
   kernel reports in ``/proc/self/smaps`` for the backend's mapping (mincore would count a
   mapped zero page too);
3. the vCPU alone is reset and reads the marker back: ``plugged_neighbour_intact``; then
   ``system_reset`` and ``cont`` run the VM again for the next access.

With ``--unplugged-inaccessible off`` the same runs against QEMU's old behaviour (one memslot,
no protection): no event, no stop, and the backend grows by what the access touched.

    .venv/bin/python bench/unplugged_access.py [--json] [--unplugged-inaccessible on|off]
        [--backend memfd|ram]

Prints one JSON object with ``--json``: ``{"read": {"event", "stopped", "rss_growth_bytes"},
"write": {...}, "plugged_neighbour_intact"}``; otherwise a table. Writes
``bench/results/unplugged_access[_off].{json,md}`` unless ``--no-write``. Needs /dev/kvm
(exits 2 without it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hostinfo
from qemu.qmp import QMPClient

from memslots.errors import EXIT_HOST_MISSING
from memslots.host.memory import HostMemory
from memslots.kvm.system import kvm_available
from memslots.kvm.vcpu import ProbeVcpu
from memslots.monitor.runtime import MachineRuntime, serve
from memslots.options import QmpEndpoint, parse_machine_config

MARKER = 0x5A
#: How long to wait for an event that protection off never sends.
QUIET_SECONDS = 1.0
WAIT = 20.0


def machine_args(inaccessible: str, backend: str) -> tuple[str, list[str], list[str]]:
    """``-m``, ``-object`` and ``-device`` of the experiment."""
    obj = {
        "memfd": "memory-backend-memfd,id=mem0,size=2G",
        "ram": "memory-backend-ram,id=mem0,size=2G,reserve=off",
    }[backend]
    layout = "memslot-size=1G" if inaccessible == "on" else "unplugged-inaccessible=off"
    return "1G,maxmem=3G", [obj], [f"virtio-mem,id=vmem0,memdev=mem0,{layout}"]


def backend_rss(memory: HostMemory) -> int:
    """The kernel's ``Rss`` of the areas of this process that map ``memory``, in bytes."""
    lo, hi = memory.host_addr, memory.host_addr + memory.size
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start < hi and end > lo
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


async def _event(listener: Any, timeout: float) -> Any:
    try:
        return await asyncio.wait_for(listener.get(), timeout)
    except TimeoutError:
        return None


async def _plug(qmp: QMPClient, size: int) -> None:
    with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as listener:
        await qmp.execute("qom-set", {"path": "vmem0", "property": "requested-size", "value": size})
        # After a reset the guest's fresh driver may have plugged it already (the requested
        # size did not change): then no event is coming.
        if await qmp.execute("qom-get", {"path": "vmem0", "property": "size"}) == size:
            return
        while True:
            event = await _event(listener, WAIT)
            if event is None:
                raise SystemExit("the guest did not plug the requested memory")
            if event["data"]["size"] == size:
                return


def _reset_and_read(vcpu: ProbeVcpu, gpa: int) -> int | None:
    vcpu.reset()
    return vcpu.read8(gpa)


async def experiment(runtime: MachineRuntime, sock: str, protected: bool) -> dict[str, Any]:
    """The accesses, through QMP; returns the result object."""
    guests = runtime.guest
    assert guests is not None and guests.vcpu is not None
    memory = runtime.machine.backends["mem0"].memory
    assert isinstance(memory, HostMemory)
    qmp = QMPClient("unplugged-access")
    await qmp.connect(sock)
    out: dict[str, Any] = {}
    intact = True
    try:
        devices: Any = await qmp.execute("query-memory-devices")
        addr, bs = devices[0]["data"]["memaddr"], devices[0]["data"]["block-size"]
        for access in ("read", "write"):
            await _plug(qmp, 2 * bs)
            marker = {"address": addr + 8, "write": True, "value": MARKER}
            await qmp.execute("x-guest-memory-access", marker)
            target = addr + 3 * bs + 64
            before = backend_rss(memory)
            with qmp.listener("X_GUEST_MEMORY_FAULT") as listener:
                args = {"address": target, "write": access == "write", "value": 1}
                await qmp.execute("x-guest-memory-access", args)
                event = await _event(listener, WAIT if protected else QUIET_SECONDS)
            status: Any = await qmp.execute("query-status")
            out[access] = {
                "event": event is not None
                and event["data"].get("address") == target
                and event["data"].get("access") == access,
                "stopped": status["status"] == "internal-error" and not status["running"],
                "rss_growth_bytes": backend_rss(memory) - before,
            }
            # The vCPU alone starts over; the plugged neighbour must still hold the marker.
            # The guests' thread uses the same vCPU: hold the machine as a command would.
            read = functools.partial(_reset_and_read, guests.vcpu, addr + 8)
            intact = intact and await runtime.locked(read) == MARKER
            await qmp.execute("system_reset")
            await qmp.execute("cont")
        await qmp.execute("quit")
    finally:
        with contextlib.suppress(EOFError):
            await qmp.disconnect()
    out["plugged_neighbour_intact"] = intact
    return out


async def run(inaccessible: str, backend: str) -> dict[str, Any]:
    """Serve the machine in this loop and run the experiment against it."""
    memory, objects, devices = machine_args(inaccessible, backend)
    config = parse_machine_config(memory, objects, devices, accel="kvm")
    with tempfile.TemporaryDirectory(prefix="ua", dir="/tmp") as tmp:
        sock = f"{tmp}/qmp.sock"
        ready: asyncio.Future[MachineRuntime] = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(
            serve(config, [QmpEndpoint(path=sock)], ready=ready.set_result, install_signals=False)
        )
        started: set[asyncio.Future[Any]] = {server, ready}
        done, _ = await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()  # raises why it could not start
        result = await experiment(ready.result(), sock, inaccessible == "on")
        await server
    return result


def markdown(result: dict[str, Any], meta: dict[str, str]) -> str:
    """The result as a Markdown table with the command and the host."""
    lines = [
        "# A guest touches an unplugged block of a mapped memslot (real kernel, CPL3 vCPU)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Host: {meta['host']}; {meta['date']}. Machine: `{meta['machine']}`.",
        "",
        "| access | X_GUEST_MEMORY_FAULT | VM stopped (internal-error) | backend RSS growth |",
        "|---|---|---|---|",
    ]
    for access in ("read", "write"):
        r = result[access]
        lines.append(
            f"| {access} | {'yes' if r['event'] else 'no'} | {'yes' if r['stopped'] else 'no'} "
            f"| {r['rss_growth_bytes']} B |"
        )
    intact = "yes" if result["plugged_neighbour_intact"] else "no"
    lines += [
        "",
        f"Plugged neighbour block readable with its data after a vCPU reset: {intact}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run the experiment; print JSON or a table; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--unplugged-inaccessible", choices=("on", "off"), default="on")
    parser.add_argument("--backend", choices=("memfd", "ram"), default="memfd")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results")
    args = parser.parse_args()
    if not kvm_available():
        print("unplugged_access: needs /dev/kvm", file=sys.stderr)
        raise SystemExit(EXIT_HOST_MISSING)
    result = asyncio.run(run(args.unplugged_inaccessible, args.backend))
    memory, objects, devices = machine_args(args.unplugged_inaccessible, args.backend)
    meta = {
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "host": f"{hostinfo.cpu_model()}, Linux {platform.release()}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"-m {memory} -object {objects[0]} -device {devices[0]}",
    }
    if not args.no_write:
        suffix = "" if args.unplugged_inaccessible == "on" else "_off"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"unplugged_access{suffix}.json").write_text(
            json.dumps({"meta": meta, "result": result}, indent=2) + "\n"
        )
        (args.out / f"unplugged_access{suffix}.md").write_text(markdown(result, meta))
    print(json.dumps(result) if args.json else markdown(result, meta))


if __name__ == "__main__":
    main()
