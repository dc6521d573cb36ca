"""Live migration between two ``memslots run`` processes on the real kernel, measured.

Rows: a 1 TiB virtio-mem device (dynamic memslots) with 1, 4 and 16 GiB plugged, its guest
``idle`` or ``dirtying`` (the vCPU rewriting a working set of 64 units every 20 ms while RAM
flows); a guest whose memory is in use holds data in ``--fill`` bytes of it (up to the plugged
size; source and destination each hold a copy, so the host's memory bounds it). Then
``x-ignore-shared`` over ``unix:`` (a shared memfd handed over by fd) with the same sizes,
dirtying, to compare its downtime with the copying rows of the same run. Every migration goes
to a fresh destination started with the same command line plus ``-incoming``; the destination
runs as soon as it loaded (its RESUME ends the source's downtime, which QEMU's ``downtime``
field then reports).

Per row: bytes sent and RAM pages (data, zero) against plugged, re-sent bytes, passes
(``dirty-sync-count``), total time, setup time, downtime, whether the destination's vCPU read
back every pattern, and throughput (bytes sent per second of ``total-time``) as a fraction of a
raw loopback copy of the same byte count over the same kind of socket (a forked ``sendall``
into ``recv_into``), measured right after the row in the same run. Medians of ``--repeat``.

Last, what dirty logging costs the kernel per VM (each ``memslots run`` lives in a memory
cgroup of its own): the rise of the source's kernel memory once a migration runs, for one 1 TiB
memslot (``dynamic-memslots=off``) against dynamic memslots, 4 GiB plugged, beside the model's
figure (``x-query-kernel-metadata``).

    .venv/bin/python bench/migrate.py [--repeat 3] [--fill 4G] [--out bench/results]

Results: ``bench/results/migrate.{json,md}``. Needs ``/dev/kvm``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import os
import platform
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

from memslots.host.libc import madvise
from memslots.host.memory import RamBackend
from memslots.kvm.system import kvm_available
from memslots.migration.stream import RamSource, RamTarget
from memslots.sizes import GiB, MiB, format_size, parse_size

DEVICE_SIZE = "1T"
BOOT = "1G"
PLUGGED = (1 * GiB, 4 * GiB, 16 * GiB)
WORKLOAD = {"units": 64, "period": 0.02}
CHUNK = 4 * MiB


def machine(backend: str, dynamic: bool = True) -> list[str]:
    return [
        "-m", f"{BOOT},maxmem=1025G",
        "-object", f"{backend},id=mem0,size={DEVICE_SIZE},reserve=off",
        "-device", f"virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots={'on' if dynamic else 'off'}",
        "-accel", "kvm",
    ]  # fmt: skip


RAM = "memory-backend-ram"
SHARED = "memory-backend-memfd,share=on"


@contextlib.contextmanager
def spawned(args: list[str], sock: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "memslots.cli.main", "run", *args, "-qmp", f"unix:{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"memslots run failed: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError("memslots run did not start")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(60)
        if proc.stderr is not None:
            proc.stderr.close()


@contextlib.asynccontextmanager
async def qmp(sock: str) -> AsyncIterator[QMPClient]:
    client = QMPClient("bench")
    # The socket's file exists a moment before the server listens on it.
    for attempt in range(100):
        try:
            await client.connect(sock)
            break
        except ConnectError:
            if attempt == 99:
                raise
            await asyncio.sleep(0.05)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def execute(client: QMPClient, command: str, args: dict[str, Any] | None = None) -> Any:
    return await client.execute(command, args)


async def resize(client: QMPClient, size: int) -> None:
    await execute(client, "qom-set", {"path": "vmem0", "property": "requested-size", "value": size})
    deadline = time.monotonic() + 300
    while await execute(client, "qom-get", {"path": "vmem0", "property": "size"}) != size:
        if time.monotonic() > deadline:
            raise RuntimeError("the guest did not plug the requested size")
        await asyncio.sleep(0.05)


async def until(client: QMPClient, command: str, done: Any, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await execute(client, command)
        if done(got):
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{command}: still {got}")
        await asyncio.sleep(0.05)


def ended(info: Any) -> bool:
    return info.get("status") in ("completed", "failed", "cancelled")


async def migrate_once(
    workdir: str, backend: str, plugged: int, fill: int, dirtying: bool, shared: bool
) -> dict[str, Any]:
    src_sock, dst_sock, uri = f"{workdir}/s.sock", f"{workdir}/d.sock", f"unix:{workdir}/m.sock"
    args = machine(backend)
    with spawned(args, src_sock) as src, spawned([*args, "-incoming", uri], dst_sock) as dst:
        async with qmp(src_sock) as qs, qmp(dst_sock) as qd:
            await resize(qs, plugged)
            written = 0
            if fill:
                written = (await execute(qs, "x-guest-fill", {"id": "vmem0", "size": fill}))[
                    "written"
                ]
            if dirtying:
                await execute(qs, "x-guest-workload", {"id": "vmem0", **WORKLOAD})
                await asyncio.sleep(0.5)
            await execute(qs, "migrate-set-parameters", {"max-bandwidth": 1 << 40})
            await execute(
                qs,
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": shared}]},
            )
            cpu0 = cpu_seconds(src.pid) + cpu_seconds(dst.pid)
            await execute(qs, "migrate", {"uri": uri})
            info = await until(qs, "query-migrate", ended)
            cpu = cpu_seconds(src.pid) + cpu_seconds(dst.pid) - cpu0
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
            await until(qd, "query-status", lambda s: s["status"] == "running")
            verdict = await execute(qd, "x-guest-verify", {"id": "vmem0"})
            for client in (qs, qd):
                await execute(client, "quit")
    ram = info["ram"]
    return {
        "transferred": ram["transferred"],
        "normal": ram["normal"],
        "duplicate": ram["duplicate"],
        "resent_bytes": ram["x-resent-bytes"],
        "passes": ram["dirty-sync-count"],
        "total_ms": info["total-time"],
        "setup_ms": info["setup-time"],
        "downtime_ms": info["downtime"],
        "downtime_bytes": ram["downtime-bytes"],
        "filled": written,
        "cpu_s": cpu,
        "verified": not verdict["violations"] and verdict["checked"] > 0,
    }


# -- the raw loopback copy -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used so far (every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_copy(nbytes: int) -> tuple[float, float]:
    """A forked sender moves ``nbytes`` of memory into ours over AF_UNIX: the source filled,
    the destination fresh memory of the kind a destination's backend maps (anonymous,
    MAP_NORESERVE, transparent huge pages asked for), so both pay the same first touch.
    Returns the seconds it took and the CPU seconds both sides used."""
    nbytes = max(-(-nbytes // 4096) * 4096, 4096)
    with RamBackend("raw-src", nbytes) as src, RamBackend("raw-dst", nbytes, reserve=False) as dst:
        block = os.urandom(min(nbytes, CHUNK))
        for off in range(0, nbytes, len(block)):
            src.write(off, block[: nbytes - off])
        madvise(dst.host_addr, nbytes, mmap.MADV_DONTFORK, "MADV_DONTFORK")
        out = RamSource.of_memory(src).view
        into = RamTarget.of_memory(dst).view
        sender, receiver = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                receiver.close()
                if sender.recv(1) == b"g":
                    for off in range(0, nbytes, CHUNK):
                        sender.sendall(out[off : off + CHUNK])
                    status = 0
            finally:
                os._exit(status)
        sender.close()
        try:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            receiver.sendall(b"g")
            t0, c0 = time.perf_counter(), time.thread_time()
            got = 0
            while got < nbytes:
                n = receiver.recv_into(into[got:], nbytes - got)
                if not n:
                    raise RuntimeError("raw copy ended early")
                got += n
            elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
        finally:
            receiver.close()
            os.waitpid(pid, 0)
            out.release()
            into.release()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        sender_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return elapsed, cpu + sender_cpu


# -- kernel memory of dirty logging ----------------------------------------------------------------


async def dirty_log_cost(workdir: str, dynamic: bool, plugged: int) -> dict[str, Any]:
    """The source's kernel memory before and while a migration (to /dev/null, slowed so it
    stays in its live phase) logs dirty pages; then cancelled."""
    sock = f"{workdir}/k.sock"
    with spawned(machine(RAM, dynamic), sock):
        async with qmp(sock) as q:
            await resize(q, plugged)
            before = await execute(q, "x-query-kernel-metadata")
            await execute(q, "migrate-set-parameters", {"max-bandwidth": 1 << 20})
            await execute(q, "migrate", {"uri": "file:/dev/null"})
            await until(
                q,
                "query-migrate",
                lambda i: i.get("status") == "active" and i["ram"]["dirty-sync-count"] >= 1,
            )
            during = await execute(q, "x-query-kernel-metadata")
            await execute(q, "migrate_cancel")
            await until(q, "query-migrate", ended)
            await execute(q, "quit")
    b, d = before["kernel-memory"], during["kernel-memory"]
    return {
        "layout": "dynamic" if dynamic else "single",
        "source": d["source"],
        "measured_bytes": d["bytes"] - b["bytes"],
        "model_bytes": d["model-bytes"] - b["model-bytes"],
        "memslots": during["memslots"],
    }


# -- the run ---------------------------------------------------------------------------------------


def rows_to_run(fill: int) -> list[dict[str, Any]]:
    rows = []
    for shared in (False, True):
        for plugged in PLUGGED:
            for dirtying in (False, True) if not shared else (True,):
                rows.append(
                    {
                        "mode": "x-ignore-shared" if shared else "copy",
                        "plugged": plugged,
                        "guest": "dirtying" if dirtying else "idle",
                        "fill": min(fill, plugged),
                    }
                )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fill", default="4G", help="data the guest holds, at most (default 4G)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not kvm_available():
        print("bench/migrate.py needs /dev/kvm", file=sys.stderr)
        return 2
    fill = parse_size(args.fill, what="--fill")
    # SIGTERM ends the run through the with-blocks, so no child is left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mig", dir="/tmp") as workdir:
        for row in rows_to_run(fill):
            runs = []
            for _ in range(args.repeat):
                run = asyncio.run(
                    migrate_once(
                        workdir,
                        SHARED if row["mode"] == "x-ignore-shared" else RAM,
                        row["plugged"],
                        row["fill"],
                        row["guest"] == "dirtying",
                        row["mode"] == "x-ignore-shared",
                    )
                )
                run["raw_s"], run["raw_cpu_s"] = raw_copy(run["transferred"])
                run["ratio"] = run["raw_s"] / (run["total_ms"] / 1000)
                run["cpu_ratio"] = run["raw_cpu_s"] / run["cpu_s"]
                runs.append(run)
            summary = {
                k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("verified",)
            }
            summary["verified"] = all(r["verified"] for r in runs)
            results.append({**row, **summary, "runs": runs})
            print(
                f"{row['mode']:16} {format_size(row['plugged']):>7} {row['guest']:8} "
                f"sent {format_size(int(summary['transferred'])):>10} "
                f"passes {summary['passes']:.0f} total {summary['total_ms']:.0f} ms "
                f"downtime {summary['downtime_ms']:.0f} ms ratio {summary['ratio']:.2f}",
                flush=True,
            )
        costs = [
            asyncio.run(dirty_log_cost(workdir, dynamic, 4 * GiB)) for dynamic in (False, True)
        ]
    for c in costs:
        print(
            f"dirty logging, {c['layout']:7}: kernel +{format_size(c['measured_bytes'])} "
            f"({c['source']}), model +{format_size(c['model_bytes'])}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": shlex.join([sys.argv[0], *sys.argv[1:]]),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "repeat": args.repeat,
    }
    (args.out / "migrate.json").write_text(
        json.dumps({"meta": meta, "rows": results, "dirty_log": costs}, indent=2) + "\n"
    )
    (args.out / "migrate.md").write_text(markdown(results, costs, meta))
    return 0


def markdown(
    results: list[dict[str, Any]], costs: list[dict[str, Any]], meta: dict[str, Any]
) -> str:
    lines = [
        "# bench/migrate.py",
        "",
        f"`{meta['command']}` on {meta['kernel']}, {meta['cpus']} CPUs (load average "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average'])}); medians of {meta['repeat']}.",
        "",
        "| mode | plugged | guest | data | sent | data pages | re-sent | passes | total | "
        "downtime | verified | throughput / raw |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {format_size(r['plugged'])} | {r['guest']} | "
            f"{format_size(int(r['filled']))} | {format_size(int(r['transferred']))} | "
            f"{int(r['normal'])} | {format_size(int(r['resent_bytes']))} | {r['passes']:.0f} | "
            f"{r['total_ms']:.0f} ms | {r['downtime_ms']:.0f} ms | "
            f"{'yes' if r['verified'] else 'NO'} | {r['ratio']:.2f} |"
        )
    lines += [
        "",
        "| dirty logging | memslots | kernel memory (measured) | model |",
        "|---|---|---|---|",
    ]
    for c in costs:
        lines.append(
            f"| {c['layout']} | {c['memslots']} | {format_size(c['measured_bytes'])} "
            f"({c['source']}) | {format_size(c['model_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
