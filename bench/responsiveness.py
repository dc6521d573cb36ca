"""Is ``memslots run`` responsive while a virtio-mem device grows from 0 to 1 TiB?

Each scenario starts a fresh ``memslots run`` (``-accel sim`` unless ``--accel kvm``) with a
1 TiB virtio-mem device (``dynamic-memslots=on``) and sets ``requested-size`` to 1 TiB: 8192
PLUG requests of the Linux guest model, 256 memslots mapped.

* ``grow``: while it grows, a second QMP client sends ``query-status`` every 20 ms, and
  ``qom-get`` of the device's size and a metrics scrape go out every 100 ms, each on its own
  schedule (a late answer does not delay the next question); each latency is send to reply.
* ``grow, back-end stopped``: the same with a real vhost-user back-end attached
  (qemu-storage-daemon exporting vhost-user-blk, ``memslot-accounting=precise``, a 1 TiB
  ``memory-backend-memfd``), SIGSTOPped 0.3 s into the resize, so that a memory-map commit
  waits for it (its timeout is 5 s); SIGCONTed at the end.
* ``sigterm`` (and with the back-end stopped at 0.3 s): SIGTERM 1 s into the resize; the time
  until the process has exited, its exit status, and whether its QMP socket is gone.

Latencies are wall-clock time, as a client sees them; the host is shared, so each scenario runs
``--repeats`` times (alternating trees with ``--baseline DIR``, a checkout to compare with, e.g.
``git worktree add /tmp/base d9bbc75``) and the table gives the medians over the runs.

    .venv/bin/python bench/responsiveness.py [--repeats 3] [--accel sim|kvm] [--baseline DIR]

Writes bench/results/responsiveness.{json,md} (``responsiveness-kvm.*`` with ``--accel kvm``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hostinfo
from qemu.qmp import QMPClient

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
QSD = "/usr/bin/qemu-storage-daemon"
TiB = 1 << 40
STATUS_PERIOD = 0.02
SLOW_PERIOD = 0.1
STOP_BACKEND_AFTER = 0.3
SIGTERM_AFTER = 1.0
#: A process still there this long after SIGTERM is counted as having lost the signal.
SIGTERM_GRACE = 30.0
DEADLINE = 300.0


def machine_args(backend_socket: str | None) -> list[str]:
    """The machine: a 1 TiB device, with a vhost-user-blk back-end if given its socket."""
    if backend_socket is None:
        return [
            "-m", "4G,maxmem=1028G",
            "-object", "memory-backend-ram,id=mem0,size=1T,reserve=off",
            "-device", "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
        ]  # fmt: skip
    return [
        "-m", "4G,maxmem=1028G",
        "-object", "memory-backend-memfd,id=mem0,size=1T,share=on",
        "-chardev", f"socket,id=blk0,path={backend_socket}",
        "-device", "vhost-user-blk-pci,id=disk0,chardev=blk0,memslot-accounting=precise",
        "-device", "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
    ]  # fmt: skip


@contextlib.contextmanager
def storage_daemon(workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-storage-daemon exporting a small image as vhost-user-blk at workdir/qsd.sock."""
    disk = workdir / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    path = workdir / "qsd.sock"
    proc = subprocess.Popen(
        [
            QSD,
            "--blockdev",
            f"driver=file,node-name=file0,filename={disk}",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
            f"addr.path={path},writable=on",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(path.exists, "qemu-storage-daemon's socket")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def memslots_run(
    tree: Path, accel: str, machine: list[str], workdir: Path, metrics_port: int
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``memslots run`` from ``tree``; yields the process and its QMP socket."""
    sock = str(workdir / "qmp.sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memslots.cli.main",
            "run",
            "-accel",
            accel,
            *machine,
            "-qmp",
            f"unix:{sock},server=on,wait=off",
            "--metrics-port",
            str(metrics_port),
        ],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, "the QMP socket")
        if proc.poll() is not None:
            raise SystemExit(f"memslots run from {tree} exited with {proc.returncode}")
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def client(sock: str, name: str) -> AsyncIterator[QMPClient]:
    """A connected, negotiated qemu.qmp client."""
    qmp = QMPClient(name)
    await qmp.connect(sock)
    try:
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()


async def scrape(port: int) -> None:
    """GET /metrics, reading the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await reader.read()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@dataclass
class Probes:
    """Latencies (seconds) of questions asked on a fixed schedule while something runs."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def every(self, period: float, name: str, ask: Callable[[], Any], stop: asyncio.Event) -> None:
        """Ask every ``period`` seconds until ``stop``; each answer's latency is recorded."""
        got = self.samples.setdefault(name, [])

        async def one() -> None:
            t0 = time.perf_counter()
            await ask()
            got.append(time.perf_counter() - t0)

        async def ticker() -> None:
            while not stop.is_set():
                self.tasks.append(asyncio.create_task(one()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)

        self.tasks.append(asyncio.create_task(ticker()))

    async def finish(self) -> None:
        """Wait for every question to be answered."""
        while self.tasks:
            await self.tasks.pop()


def summary(values: list[float]) -> dict[str, float]:
    """p50/p99/max in ms, and how many."""
    v = sorted(values)
    return {
        "count": len(v),
        "p50_ms": 1e3 * statistics.median(v),
        "p99_ms": 1e3 * v[min(len(v) - 1, int(0.99 * len(v)))],
        "max_ms": 1e3 * v[-1],
    }


async def grow(sock: str, port: int, backend: subprocess.Popen[bytes] | None) -> dict[str, Any]:
    """The ``grow`` scenarios: probe while the device grows to 1 TiB."""
    # A QMP session answers its commands in order: the probes that wait for the machine
    # (qom-get) get a connection of their own, as a monitoring client would.
    async with (
        client(sock, "main") as main,
        client(sock, "status") as status,
        client(sock, "qom") as qom,
    ):
        stop = asyncio.Event()
        probes = Probes()
        probes.every(STATUS_PERIOD, "query-status", lambda: status.execute("query-status"), stop)
        size = {"path": "vmem0", "property": "size"}
        probes.every(SLOW_PERIOD, "qom-get", lambda: qom.execute("qom-get", size), stop)
        probes.every(SLOW_PERIOD, "metrics", lambda: scrape(port), stop)
        t0 = time.perf_counter()
        await main.execute("qom-set", {"path": "vmem0", "property": "requested-size", "value": TiB})
        if backend is not None:
            await asyncio.sleep(STOP_BACKEND_AFTER)
            backend.send_signal(signal.SIGSTOP)
        while await main.execute("qom-get", size) != TiB:
            if time.perf_counter() - t0 > DEADLINE:
                raise SystemExit("the resize did not complete")
            await asyncio.sleep(0.05)
        resize = time.perf_counter() - t0
        stop.set()
        await probes.finish()
        if backend is not None:
            backend.send_signal(signal.SIGCONT)
        await main.execute("quit")
    return {"resize_s": resize, **{k: summary(v) for k, v in probes.samples.items()}}


async def sigterm(
    proc: subprocess.Popen[bytes], sock: str, backend: subprocess.Popen[bytes] | None
) -> dict[str, Any]:
    """The ``sigterm`` scenarios: SIGTERM into the resize, time until the process is gone."""
    async with client(sock, "main") as main:
        await main.execute("qom-set", {"path": "vmem0", "property": "requested-size", "value": TiB})
        t0 = time.perf_counter()
        if backend is not None:
            await asyncio.sleep(STOP_BACKEND_AFTER)
            backend.send_signal(signal.SIGSTOP)
        await asyncio.sleep(SIGTERM_AFTER - (time.perf_counter() - t0))
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.perf_counter() - sent < SIGTERM_GRACE:
            await asyncio.sleep(0.001)
        exited = time.perf_counter() - sent
    if proc.poll() is None:
        return {"exit_after_ms": None, "exit_status": None, "socket_removed": False}
    return {
        "exit_after_ms": 1e3 * exited,
        "exit_status": proc.returncode,
        "socket_removed": not os.path.exists(sock),
    }


def one_run(tree: Path, accel: str, scenario: str) -> dict[str, Any]:
    """One scenario on a fresh process."""
    with tempfile.TemporaryDirectory(prefix="resp") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            backend = None
            if scenario.endswith("back-end stopped"):
                backend = stack.enter_context(storage_daemon(workdir))
            path = str(workdir / "qsd.sock") if backend is not None else None
            port = free_port()
            proc, sock = stack.enter_context(
                memslots_run(tree, accel, machine_args(path), workdir, port)
            )
            if scenario.startswith("grow"):
                result = asyncio.run(grow(sock, port, backend))
                proc.wait(60)
            else:
                result = asyncio.run(sigterm(proc, sock, backend))
    return result


SCENARIOS = ("grow", "grow, back-end stopped", "sigterm", "sigterm, back-end stopped")


def median_of(runs: list[dict[str, Any]], *keys: str) -> float:
    """The median over runs of ``run[keys[0]][keys[1]]...``."""
    values = []
    for run in runs:
        v: Any = run
        for k in keys:
            v = v[k]
        values.append(float(v))
    return statistics.median(values)


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown tables (medians over the runs)."""
    lines = [
        "# `memslots run` while a virtio-mem device grows from 0 to 1 TiB",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{hostinfo.sentence(report)}; `-accel {report['accel']}`; medians of "
        f"{report['repeats']} runs; wall-clock times.",
        "",
        "| tree | scenario | resize (s) | query-status p50 / p99 / max (ms) | qom-get p99 (ms) "
        "| metrics p99 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for tree, per in report["runs"].items():
        for scenario in SCENARIOS[:2]:
            runs = per[scenario]
            lines.append(
                f"| {tree} | {scenario} | {median_of(runs, 'resize_s'):.1f} "
                f"| {median_of(runs, 'query-status', 'p50_ms'):.1f} / "
                f"{median_of(runs, 'query-status', 'p99_ms'):.1f} / "
                f"{median_of(runs, 'query-status', 'max_ms'):.1f} "
                f"| {median_of(runs, 'qom-get', 'p99_ms'):.0f} "
                f"| {median_of(runs, 'metrics', 'p99_ms'):.0f} |"
            )
    lines += [
        "",
        "| tree | scenario | SIGTERM to exit (ms) | exit status | QMP socket removed |",
        "|---|---|---|---|---|",
    ]
    for tree, per in report["runs"].items():
        for scenario in SCENARIOS[2:]:
            runs = per[scenario]
            exited = [r for r in runs if r["exit_after_ms"] is not None]
            after = f"{median_of(exited, 'exit_after_ms'):.0f}" if exited else "-"
            if len(exited) < len(runs):
                after += f" ({len(runs) - len(exited)} of {len(runs)} still running "
                after += f"{SIGTERM_GRACE:.0f} s later)"
            statuses = sorted({str(r["exit_status"]) for r in exited})
            removed = all(r["socket_removed"] for r in runs)
            lines.append(
                f"| {tree} | {scenario} | {after} | {', '.join(statuses) or '-'} "
                f"| {'yes' if removed else 'no'} |"
            )
    lines += [
        "",
        f"query-status every {STATUS_PERIOD * 1e3:.0f} ms, qom-get and a metrics scrape every "
        f"{SLOW_PERIOD * 1e3:.0f} ms, each on its own schedule; the back-end is SIGSTOPped "
        f"{STOP_BACKEND_AFTER} s into the resize; SIGTERM goes {SIGTERM_AFTER} s into it.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    """Run every scenario ``--repeats`` times (per tree), write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accel", choices=("sim", "kvm"), default="sim")
    parser.add_argument("--baseline", type=Path, help="a checkout to measure too")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not os.access(QSD, os.X_OK):
        print(f"responsiveness: needs {QSD} (qemu-system-common)", file=sys.stderr)
        return 2
    trees = {"this tree": REPO}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        t: {s: [] for s in SCENARIOS} for t in trees
    }
    load_start = hostinfo.loadavg()
    for i in range(args.repeats):
        for scenario in SCENARIOS:
            for name, tree in trees.items():
                result = one_run(tree, args.accel, scenario)
                runs[name][scenario].append(result)
                print(f"run {i + 1}, {name}, {scenario}: {result}", file=sys.stderr)
    report = {
        "command": shlex.join([".venv/bin/python", "bench/responsiveness.py", *sys.argv[1:]]),
        **hostinfo.record(load_start),
        "accel": args.accel,
        "repeats": args.repeats,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "responsiveness" if args.accel == "sim" else f"responsiveness-{args.accel}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
