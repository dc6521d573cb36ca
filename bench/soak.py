"""Benchmark: a soak of ``memslots run`` (issue 9, item 7): everything at once, for N minutes.

``memslots run`` runs as a child process on real KVM, with the probe vCPU, a 1 TiB virtio-mem
device (dynamic memslots) and Debian's qemu-storage-daemon attached as vhost-user-blk. This
script drives it only through the unmodified ``qemu.qmp`` client and its metrics endpoint:

* the trace: the guest model resizes the device to a random size (2 MiB granularity, up to
  ``--max-size``) through ``qom-set requested-size``, one step at a time, each step waiting
  until the device's ``size`` got there;
* every step is checked from inside the guest: ``x-query-guest verify=true`` makes each guest
  driver check the pattern of every sub-block it uses with guest loads on the vCPU, and its
  check failures (``violations``) must stay 0. The step's memslot map is checked too: mapped
  exactly where blocks are plugged, plugged blocks adding up to the size, each mapped memslot
  in a KVM slot and in the back-end (whose own ``/proc/PID/maps`` must hold one memfd mapping
  per mapped memslot while it is connected);
* background load: QMP clients querying all the time, a client that connects, asks and leaves
  every few seconds, the Prometheus endpoint scraped every 2 s;
* faults injected: the back-end SIGKILLed every ``--backend-every`` seconds, in turn in the
  middle of a resize and while nothing changes, then restarted and
  ``x-vhost-user-reconnect``ed (the ``X_VHOST_USER_STATE`` events "disconnected", before any
  further step, then "connected", must arrive); rude clients that hang up before the
  handshake, mid-message, or with a command in flight, or send malformed JSON.

**Checkpoints and samples.** Every ``--sample-every`` seconds (and at the start and the end) the
background load is paused, the device is brought to ``--checkpoint`` (the same state every
time: the guest plugs lowest addresses first and unplugs highest first), the guest verifies,
and after ``SETTLE`` seconds (for RCU-deferred frees, see below) the process is sampled: open
descriptors, RSS, mappings (``/proc/PID/maps`` lines), threads, KVM memslots in use and kernel
memory of the VM (its memory cgroup, ``x-query-kernel-metadata``), plus the counters that grow:
guest requests, KVM memslot creates and deletes (metrics), faults injected, sub-blocks checked.

**Warm-up and flat.** The run starts with a ramp to ``--max-size`` and back, so that every
sub-block the guest ever uses has been touched (the vCPU's shadow pages, the guest model's block
table and Python's heap reach their size), and the first back-end kill falls in the warm-up.
Warm-up is the first ``--warmup`` seconds; every sample from then on counts. A counter is flat
if max - min over those samples is within its bound (:data:`BOUNDS`): descriptors, mappings,
threads and KVM memslots exactly equal, RSS within 2 MiB (issue 9's bound), kernel memory within
one page per CPU (the slab's per-CPU object stock, :func:`kernel_memory_bound`). The verdict is
PASS if every counter is flat, no check failed, every expected event arrived, no client got an
error, the process exited 0 after ``quit`` with its memory cgroup removed, and its log holds no
traceback.

Kernel memory is read after ``SETTLE`` seconds of quiet: objects the kernel frees after an RCU
grace period (page-table pages, xarray nodes of the memfd, files) are still charged right after
a change. Read at once, the figure of an otherwise identical state moved by up to ~200 KiB here
(the "208 KiB step" of ``bench/run_cycles.py``); after 0.3 s it is exact.

    .venv/bin/python bench/soak.py --minutes 30 [--seed 1] [--out bench/results]

Writes ``soak.json`` and ``soak.md`` to ``--out``; exits 0 on PASS, 1 on FAIL, 2 if the host
lacks ``/dev/kvm`` or qemu-storage-daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import EventListener, QMPClient

from memslots.host.kmem import locate_memory_cgroup
from memslots.kvm.host import host_info
from memslots.sizes import GiB, KiB, MiB, format_size, parse_size

ROOT = Path(__file__).resolve().parents[1]
# The real back-ends' helpers live with the tests (start, SIGKILL, restart, /proc views).
sys.path.insert(0, str(ROOT / "tests"))
from backends import QSD, QemuStorageDaemon, memfd_mappings  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEVICE = "vmem0"
BACKEND = "disk0"
BLOCK = 2 * MiB
#: Seconds of quiet before a sample: the kernel frees some objects an RCU grace period late.
SETTLE = 0.5
#: A step that takes longer than this has stopped (a safety net, not a measurement: a
#: 0 -> 1 TiB resize takes ~10 s here).
STEP_TIMEOUT = 600.0
#: The same for a QMP event that must arrive, and for the process's start and exit.
EVENT_TIMEOUT = 60.0
PAGE = os.sysconf("SC_PAGE_SIZE")
#: Commands the querying clients pick from (all read-only).
QUERIES = (
    ("query-status", None),
    ("query-memory-devices", None),
    ("query-memory-size-summary", None),
    ("x-query-memslots", None),
    ("x-query-memslot-budget", None),
    ("x-query-kernel-metadata", None),
    ("x-query-guest", None),
    ("qom-get", {"path": DEVICE, "property": "size"}),
    ("qom-get", {"path": DEVICE, "property": "requested-size"}),
    ("query-commands", None),
)


def kernel_memory_bound() -> int:
    """How far two readings of the same state may differ: the slab charges objects to the
    memory cgroup in whole pages from a per-CPU stock, so up to a page per CPU is held."""
    return (os.cpu_count() or 1) * PAGE


#: Flat: max - min over the samples after the warm-up at most this (None: the function's).
BOUNDS: dict[str, int | None] = {
    "fds": 0,
    "maps": 0,
    "threads": 0,
    "kvm_memslots": 0,
    "rss": 2 * MiB,
    "kernel_memory": None,
}


def bound_of(counter: str) -> int:
    """The flatness bound of a sampled counter."""
    fixed = BOUNDS[counter]
    return kernel_memory_bound() if fixed is None else fixed


@dataclass
class SoakOptions:
    """What to run (the command line's options)."""

    minutes: float = 30.0
    seed: int = 1
    device_size: int = 1 << 40
    max_size: int = 1 << 40
    checkpoint: int = 16 * GiB
    sample_every: float = 60.0
    warmup: float = 300.0
    backend_every: float = 180.0
    queriers: int = 2
    out: Path = RESULTS


@dataclass
class Tally:
    """Everything counted while the soak runs."""

    steps: int = 0
    checked: int = 0
    queries: int = 0
    scrapes: int = 0
    connections: int = 0
    backend_kills: int = 0
    client_faults: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        """Record a check failure (and say it at once)."""
        print(f"FAIL: {what}", flush=True)
        self.failures.append(what)


class Gate:
    """Lets the background clients run, or holds them while a checkpoint samples."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """One operation of a background client (waits while the gate is closed)."""
        await self._open.wait()
        self._busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def close(self) -> None:
        """Hold new operations and wait for those under way."""
        self._open.clear()
        await self._idle.wait()

    def open(self) -> None:
        """Let them run again."""
        self._open.set()


# -- the process and the back-end ------------------------------------------------------------


def run_argv(opts: SoakOptions, qsd_sock: str, qmp_sock: str) -> list[str]:
    """``memslots run`` with the back-end and the 1 TiB device (the back-end's 32 regions
    decide its memslots: precise accounting gives the device all of them)."""
    return [
        sys.executable,
        "-m",
        "memslots.cli.main",
        "run",
        "-m",
        f"1G,maxmem={opts.device_size + GiB}",
        "-object",
        f"memory-backend-memfd,id=mem0,size={opts.device_size},share=on,reserve=off",
        "-chardev",
        f"socket,id=blk0,path={qsd_sock}",
        "-device",
        f"vhost-user-blk-pci,id={BACKEND},chardev=blk0,memslot-accounting=precise",
        "-device",
        f"virtio-mem,id={DEVICE},memdev=mem0,dynamic-memslots=on",
        "-qmp",
        f"unix:{qmp_sock},server=on,wait=off",
        "--metrics-port",
        "0",
    ]


def wait_for_start(proc: subprocess.Popen[bytes], log: Path, qmp_sock: str) -> int:
    """Wait until the QMP socket exists and the log names the metrics port; returns it."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", log.read_text(errors="replace"))
        if found and os.path.exists(qmp_sock):
            return int(found.group(1))
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"memslots run did not start: {log.read_text(errors='replace')}")
        time.sleep(0.05)


def process_sample(pid: int) -> dict[str, int]:
    """Descriptors, mappings, threads and RSS (with its parts) of ``pid``."""
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "maps": maps,
        "threads": int(status["Threads"][0]),
        "rss": int(status["VmRSS"][0]) * KiB,
        "rss_anon": int(status["RssAnon"][0]) * KiB,
        "rss_shmem": int(status["RssShmem"][0]) * KiB,
    }


# -- metrics ---------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """The metrics endpoint once: each sample by name (labels joined in), parsed by
    prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def requests_total(metrics: dict[str, float]) -> int:
    """Guest requests the device handled, every type and response."""
    return int(
        sum(v for k, v in metrics.items() if k.startswith("memslots_virtio_mem_requests_total"))
    )


# -- the soak --------------------------------------------------------------------------------


class Soak:
    """One soak run: the clients, the trace, the faults, the samples."""

    def __init__(
        self,
        opts: SoakOptions,
        proc: subprocess.Popen[bytes],
        qsd: QemuStorageDaemon,
        qmp_sock: str,
        metrics_port: int,
    ) -> None:
        self.opts = opts
        self.proc = proc
        self.qsd = qsd
        self.qmp_sock = qmp_sock
        self.metrics_port = metrics_port
        self.rng = random.Random(opts.seed)
        self.tally = Tally()
        self.gate = Gate()
        self.stop = asyncio.Event()
        self.samples: list[dict[str, Any]] = []
        self.connected = True
        self.t0 = time.monotonic()
        self.next_kill = opts.warmup / 2
        self.qmp = QMPClient("soak-driver")
        self.memslot_size = 0

    def now(self) -> float:
        """Seconds since the soak started."""
        return time.monotonic() - self.t0

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """A command of the driver's client."""
        return await self.qmp.execute(cmd, args)

    # -- the trace -------------------------------------------------------------------------

    async def resize(self, size: int, *, kill: bool = False) -> None:
        """Ask for ``size`` (SIGKILL the back-end right after, mid-resize, if ``kill``), wait
        until the device got there, then check the step."""
        await self.execute("qom-set", {"path": DEVICE, "property": "requested-size", "value": size})
        if kill:
            self.qsd.kill()
            self.tally.backend_kills += 1
            self.connected = False
        deadline = time.monotonic() + STEP_TIMEOUT
        while await self.execute("qom-get", {"path": DEVICE, "property": "size"}) != size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the device did not reach {format_size(size)}")
            await asyncio.sleep(0.02)
        self.tally.steps += 1
        await self.check_step(size)

    async def check_step(self, size: int) -> None:
        """The checks after every step: from inside the guest, then the memslot map."""
        guest = await self.execute("x-query-guest", {"verify": True})
        for driver in guest["drivers"]:
            self.tally.checked += driver["checked"]
            if driver["violations"]:
                self.tally.fail(
                    f"{driver['device']}: {driver['violations']} failed checks, the last: "
                    f"{driver.get('last-violation')}"
                )
            if driver["state"] != "running" or driver["plugged-size"] != size:
                self.tally.fail(f"guest driver after a step to {size}: {driver}")
        slots = [s for s in await self.execute("x-query-memslots") if s["device"] == DEVICE]
        budget = await self.execute("x-query-memslot-budget")
        # A killed back-end is noticed at the next memory-table change, not before.
        believed = next(c for c in budget["consumers"] if c["name"] == BACKEND)["connected"]
        self.memslot_size = slots[0]["size"]
        mapped = [s for s in slots if s["mapped"]]
        plugged = sum(s["plugged-blocks"] for s in slots) * BLOCK
        wrong = [
            s
            for s in slots
            if s["mapped"] != (s["plugged-blocks"] > 0)
            or (s["mapped"] and s["kvm-slot"] is None)
            or s["vhost"] != ([BACKEND] if s["mapped"] and believed else [])
        ]
        if plugged != size or wrong:
            self.tally.fail(f"memslot map at {format_size(size)}: {plugged=}, memslots {wrong}")
        if self.connected and not believed:
            self.tally.fail("the back-end runs and was reconnected, but counts as disconnected")
        if self.connected:
            held = len(memfd_mappings(self.qsd.memory_pid))
            if held != len(mapped):
                self.tally.fail(f"the back-end maps {held} regions, {len(mapped)} are mapped")

    def random_size(self) -> int:
        """A size for the next step: uniform in [0, max-size], in 2 MiB blocks."""
        return self.rng.randrange(self.opts.max_size // BLOCK + 1) * BLOCK

    async def backend_fault(self, states: EventListener) -> None:
        """SIGKILL the back-end, in the middle of a resize or while nothing changes (in turn);
        it must be reported lost ("disconnected") either way, before any further step; restart
        it and reconnect ("connected": the table is replayed)."""
        if self.tally.backend_kills % 2:
            self.qsd.kill()
            self.tally.backend_kills += 1
            self.connected = False
        else:
            await self.resize(self.random_size(), kill=True)
        lost: Any = await asyncio.wait_for(states.get(), EVENT_TIMEOUT)
        self.tally.events.append({"at": round(self.now(), 1), **lost["data"]})
        if lost["data"]["state"] != "disconnected" or not lost["data"].get("reason"):
            self.tally.fail(f"after the kill: {lost['data']}")
        self.qsd.start()
        await self.execute("x-vhost-user-reconnect", {"id": BACKEND})
        back: Any = await asyncio.wait_for(states.get(), EVENT_TIMEOUT)
        self.tally.events.append({"at": round(self.now(), 1), **back["data"]})
        if back["data"] != {"id": BACKEND, "state": "connected"}:
            self.tally.fail(f"after the reconnect: {back['data']}")
        self.connected = True
        # The whole table was replayed: the back-end maps every mapped memslot again.
        size = await self.execute("qom-get", {"path": DEVICE, "property": "size"})
        await self.check_step(size)

    async def trace(self, states: EventListener) -> None:
        """The driver: a ramp to the maximum and back, then random steps until the end, with a
        checkpoint every ``sample_every`` seconds and a back-end fault every
        ``backend_every``."""
        end = self.opts.minutes * 60
        next_sample = self.opts.sample_every
        await self.checkpoint()
        for size in (self.opts.max_size, self.opts.checkpoint):
            await self.resize(size)
        while self.now() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"memslots run exited with {self.proc.returncode}")
            if self.now() >= next_sample:
                await self.checkpoint()
                while next_sample <= self.now():  # a slow step may have taken several
                    next_sample += self.opts.sample_every
            elif self.now() >= self.next_kill:
                await self.backend_fault(states)
                self.next_kill += self.opts.backend_every
            else:
                await self.resize(self.random_size())
        await self.checkpoint()

    # -- checkpoints ------------------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Pause the background load, bring the device to the checkpoint, verify, settle and
        sample; print the minute's line."""
        await self.gate.close()
        self.qmp.events.clear()
        try:
            await self.resize(self.opts.checkpoint)
            metrics = await asyncio.to_thread(scrape, self.metrics_port)
            await asyncio.sleep(SETTLE)
            proc = process_sample(self.proc.pid)
            kmeta = await self.execute("x-query-kernel-metadata")
            budget = await self.execute("x-query-memslot-budget")
        finally:
            self.gate.open()
        kvm = next(c for c in budget["consumers"] if c["name"] == "kvm")
        kmem = kmeta.get("kernel-memory")
        plugged = metrics.get(f"memslots_virtio_mem_plugged_bytes{{device={DEVICE}}}")
        if plugged != self.opts.checkpoint:
            self.tally.fail(f"metrics say {plugged} bytes plugged at the checkpoint")
        t = self.tally
        sample = {
            "seconds": round(self.now(), 1),
            **proc,
            "kvm_memslots": kvm["used-memslots"],
            "kernel_memory": kmem["bytes"] if kmem else None,
            "kernel_memory_model": kmem["model-bytes"] if kmem else None,
            "kernel_memory_source": kmem["source"] if kmem else None,
            "requests": requests_total(metrics),
            "memslot_creates": int(metrics["memslots_kvm_memslot_creates_total"]),
            "memslot_deletes": int(metrics["memslots_kvm_memslot_deletes_total"]),
            "faults_injected": t.backend_kills + t.client_faults,
            "backend_kills": t.backend_kills,
            "client_faults": t.client_faults,
            "steps": t.steps,
            "checked": t.checked,
            "queries": t.queries,
            "scrapes": t.scrapes,
            "connections": t.connections,
            "failures": len(t.failures),
        }
        self.samples.append(sample)
        km = format_size(sample["kernel_memory"]) if kmem else "-"
        print(
            f"[{sample['seconds'] / 60:5.1f} min] steps {t.steps}, requests "
            f"{sample['requests']}, memslot creates/deletes {sample['memslot_creates']}/"
            f"{sample['memslot_deletes']}, faults {sample['faults_injected']}, checked "
            f"{t.checked}, queries {t.queries}; fds {proc['fds']}, RSS "
            f"{format_size(proc['rss'])}, maps {proc['maps']}, KVM memslots "
            f"{sample['kvm_memslots']}, kernel memory {km}; failures {len(t.failures)}",
            flush=True,
        )

    # -- background load --------------------------------------------------------------------

    async def background(self, what: str, op: Callable[[], Awaitable[None]], pause: float) -> None:
        """Run ``op`` again and again (each a turn of the gate) until the soak stops; an
        exception is a failure."""
        while not self.stop.is_set():
            try:
                async with self.gate.turn():
                    if self.stop.is_set():
                        return
                    await op()
            except Exception as exc:
                self.tally.fail(f"{what}: {type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.rng.uniform(0, pause))

    async def querier(self, n: int) -> None:
        """A client that stays connected and asks one read-only query after another."""
        qmp = QMPClient(f"soak-query-{n}")
        await qmp.connect(self.qmp_sock)
        self.tally.connections += 1

        async def one() -> None:
            cmd, args = self.rng.choice(QUERIES)
            reply = await qmp.execute(cmd, args)
            qmp.events.clear()  # qemu.qmp's catch-all queue keeps every event otherwise
            if reply is None:
                raise RuntimeError(f"{cmd}: no result")
            self.tally.queries += 1

        try:
            await self.background(f"querier {n}", one, 0.2)
        finally:
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    async def churn(self) -> None:
        """A client that connects, asks, and leaves."""
        qmp = QMPClient("soak-churn")
        await qmp.connect(self.qmp_sock)
        self.tally.connections += 1
        try:
            status = await qmp.execute("query-status")
            if not isinstance(status, dict) or status.get("status") != "running":
                raise RuntimeError(f"query-status: {status}")
            self.tally.queries += 1
        finally:
            await qmp.disconnect()

    async def rude(self) -> None:
        """A client fault: hang up before the greeting is read, in the middle of a message,
        with a command in flight, or after malformed JSON (which must get an error reply)."""
        kind = self.rng.randrange(4)
        reader, writer = await asyncio.open_unix_connection(self.qmp_sock)
        try:
            if kind >= 1:
                await reader.readline()  # the greeting
            if kind == 1:
                writer.write(b'{"execute": "qmp_capab')
            elif kind == 2:
                writer.write(b'{"execute": "qmp_capabilities"}\n{"execute": "x-query-memslots"}\n')
            elif kind == 3:
                writer.write(b'{"execute": "qmp_capabilities"}\n{"execute": }\n')
                await writer.drain()
                replies: list[bytes] = []
                while len(replies) < 2:
                    line = await asyncio.wait_for(reader.readline(), EVENT_TIMEOUT)
                    if not line:
                        raise RuntimeError(f"the server hung up after {replies}")
                    if b'"event"' not in line:  # size-change events come to every client
                        replies.append(line)
                if b'"error"' not in replies[1]:
                    raise RuntimeError(f"malformed JSON got {replies[1]!r}")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        self.tally.client_faults += 1

    async def scraper(self) -> None:
        """Prometheus' view, every 2 s."""
        metrics = await asyncio.to_thread(scrape, self.metrics_port)
        if "memslots_kvm_memslot_creates_total" not in metrics:
            raise RuntimeError("the metrics lack memslots_kvm_memslot_creates_total")
        self.tally.scrapes += 1

    # -- the whole run ----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, start the background load, run the trace, quit."""
        await self.qmp.connect(self.qmp_sock)
        self.tally.connections += 1
        with self.qmp.listener("X_VHOST_USER_STATE") as states:
            tasks = [
                *(asyncio.create_task(self.querier(n)) for n in range(self.opts.queriers)),
                asyncio.create_task(self.background("churn", self.churn, 6)),
                asyncio.create_task(self.background("rude client", self.rude, 20)),
                asyncio.create_task(self.background("scraper", self.scraper, 4)),
            ]
            try:
                await self.trace(states)
            finally:
                self.stop.set()
                self.gate.open()
                for result in await asyncio.gather(*tasks, return_exceptions=True):
                    if isinstance(result, BaseException):
                        self.tally.fail(f"a background client: {result!r}")
            self.qmp.events.clear()  # qemu.qmp's catch-all queue, not the server's
        await self.execute("quit")
        with contextlib.suppress(EOFError):
            await self.qmp.disconnect()


# -- the verdict -----------------------------------------------------------------------------


def verdict(
    opts: SoakOptions, samples: list[dict[str, Any]], tally: Tally, ending: dict[str, Any]
) -> dict[str, Any]:
    """Flatness of each sampled counter after the warm-up, and every check."""
    after = [s for s in samples if s["seconds"] >= opts.warmup]
    flat = {}
    for counter in BOUNDS:
        values = [s[counter] for s in after if s[counter] is not None]
        spread = max(values) - min(values) if values else None
        flat[counter] = {
            "spread": spread,
            "bound": bound_of(counter),
            "flat": spread is not None and spread <= bound_of(counter),
        }
    checks = {
        "samples_after_warmup": len(after) >= 2,
        "all_flat": all(f["flat"] for f in flat.values()),
        "no_check_failed": not tally.failures,
        "guest_checked_memory": tally.checked > 0,
        "backend_killed_and_back": tally.backend_kills > 0
        and sum(e["state"] == "connected" for e in tally.events) == tally.backend_kills,
        "exit_status_0": ending["exit_status"] == 0,
        "cgroup_removed": ending["cgroup_removed"],
        "no_traceback_in_log": ending["tracebacks"] == 0,
    }
    return {"pass": all(checks.values()), "checks": checks, "flat": flat}


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page."""
    o, v = report["options"], report["verdict"]
    samples = report["samples"]
    lines = [
        f"# Soak of `memslots run`: {o['minutes']} minutes, {'PASS' if v['pass'] else 'FAIL'}",
        "",
        f"`{report['command']}` on {report['host']}, {report['date']}.",
        "",
        f"{format_size(o['device_size'])} virtio-mem device (dynamic memslots: "
        f"{report['memslots']} of {format_size(report['memslot_size'])}), qemu-storage-daemon "
        f"as vhost-user-blk, the probe vCPU; random sizes up to {format_size(o['max_size'])}, "
        f"seed {o['seed']}; samples at a {format_size(o['checkpoint'])} checkpoint every "
        f"{o['sample_every']:g} s after {SETTLE} s of quiet; warm-up {o['warmup']:g} s "
        f"(samples before it are shown, not judged).",
        "",
        "| min | steps | requests | memslot creates / deletes | faults | checked | fds | RSS "
        "| maps | threads | KVM memslots | kernel memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in samples:
        warm = "" if s["seconds"] >= o["warmup"] else " (warm-up)"
        km = format_size(s["kernel_memory"]) if s["kernel_memory"] is not None else "-"
        lines.append(
            f"| {s['seconds'] / 60:.1f}{warm} | {s['steps']} | {s['requests']} | "
            f"{s['memslot_creates']} / {s['memslot_deletes']} | {s['faults_injected']} | "
            f"{s['checked']} | {s['fds']} | {format_size(s['rss'])} | {s['maps']} | "
            f"{s['threads']} | {s['kvm_memslots']} | {km} |"
        )
    t = report["tally"]
    lines += [
        "",
        "Flat after the warm-up (max - min over its samples, against the bound):",
        "",
        "| counter | spread | bound | flat |",
        "|---|---|---|---|",
    ]
    for counter, f in v["flat"].items():
        bytes_ = counter in ("rss", "kernel_memory")
        show = (lambda n: format_size(n)) if bytes_ else str
        spread = show(f["spread"]) if f["spread"] is not None else "-"
        lines.append(
            f"| {counter} | {spread} | {show(f['bound'])} | {'yes' if f['flat'] else 'NO'} |"
        )
    lines += [
        "",
        f"Faults injected: {t['backend_kills']} back-end SIGKILLs (mid-resize and idle in turn; "
        f"events "
        f"{', '.join(e['state'] for e in t['events']) or 'none'}), {t['client_faults']} rude "
        f"clients. Load: {t['queries']} queries, {t['connections']} connections, "
        f"{t['scrapes']} metrics scrapes. Guest checks: {t['checked']} sub-block checks from "
        f"inside the guest over {t['steps']} steps; check failures: {len(t['failures'])}.",
        "",
        "Checks: "
        + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in v["checks"].items())
        + f". Verdict: **{'PASS' if v['pass'] else 'FAIL'}**.",
    ]
    if t["failures"]:
        lines += ["", "Failures:", "", *(f"* {f}" for f in t["failures"][:20])]
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    """The host's CPU model name."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def soak(opts: SoakOptions, command: str = "bench/soak.py") -> dict[str, Any]:
    """Run the soak; returns the report (also written to ``opts.out``); ``command`` is how
    it was started, for the report."""
    with tempfile.TemporaryDirectory(prefix="soak", dir="/tmp") as d:
        workdir = Path(d)
        qmp_sock = str(workdir / "qmp.sock")
        with QemuStorageDaemon(workdir) as qsd:
            log = workdir / "run.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    run_argv(opts, qsd.socket_path, qmp_sock), stdout=out, stderr=out
                )
            try:
                port = wait_for_start(proc, log, qmp_sock)
                run = Soak(opts, proc, qsd, qmp_sock, port)
                asyncio.run(run.run())
                status = proc.wait(EVENT_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
            text = log.read_text(errors="replace")
    cgroup = Path(locate_memory_cgroup().path) / f"memslots-{proc.pid}-1"
    ending = {
        "exit_status": status,
        "cgroup_removed": not cgroup.exists(),
        "tracebacks": text.count("Traceback"),
        "log_warnings": sum("warning" in line.lower() for line in text.splitlines()),
    }
    report = {
        "command": command,
        "host": f"{cpu_model()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"{host_info().describe()}",
        "date": time.strftime("%Y-%m-%d"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "memslot_size": run.memslot_size,
        "memslots": opts.device_size // run.memslot_size if run.memslot_size else None,
        "ending": ending,
        "tally": asdict(run.tally),
        "samples": run.samples,
    }
    report["verdict"] = verdict(opts, run.samples, run.tally, ending)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (opts.out / "soak.md").write_text(markdown(report))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device-size", default="1T")
    parser.add_argument("--max-size", default=None, help="largest size of the trace")
    parser.add_argument("--checkpoint", default="16G", help="the size every sample is taken at")
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds (default: 5 min, or a third of a run shorter than 15 min)",
    )
    parser.add_argument("--backend-every", type=float, default=180.0, help="seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not host_info().kvm or not os.access(QSD, os.X_OK):
        print(f"needs /dev/kvm and {QSD} (bash scripts/setup.sh --tests)", file=sys.stderr)
        return 2
    device = parse_size(args.device_size)
    warmup = args.warmup
    if warmup is None:
        warmup = 300.0 if args.minutes >= 15 else args.minutes * 20
    opts = SoakOptions(
        minutes=args.minutes,
        seed=args.seed,
        device_size=device,
        max_size=parse_size(args.max_size) if args.max_size else device,
        checkpoint=parse_size(args.checkpoint),
        sample_every=args.sample_every,
        warmup=warmup,
        backend_every=args.backend_every,
        out=args.out,
    )
    report = soak(opts, shlex.join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]]))
    print(markdown(report))
    return 0 if report["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
