"""Live pre-copy: the source side of QMP ``migrate``, as QEMU 8.2 does it.

:class:`Outgoing` runs as a task on the event loop that serves the monitor. Whatever changes or
reads the machine (device state, dirty logs, the guest's state) runs with the machine to itself
(``SourceVm.locked``: between two guest requests, commands and scrapes); only the bytes --
reading guest memory and writing the stream -- go to a worker thread without it, so the monitor
answers (``query-migrate``) while RAM flows and the guest keeps running and writing its memory.
The order (``docs/migration.md``):

1. setup: connect; every virtio-mem device answers PLUG, UNPLUG and UNPLUG_ALL with BUSY (the
   bitmap and the memslot layout are frozen); header, CONFIG (with the fds of shared memory
   under ``x-ignore-shared``) and the early states; dirty logging starts on the memslots of the
   memory that is sent (KVM's log for what the vCPU writes, :class:`DirtyTracker` for what the
   VMM writes, the queue areas always) and a first sync clears the log (dirty-sync-count 1);
2. active: a full pass over what travels (boot RAM, the plugged blocks), then rounds: sync the
   logs, keep the dirty pages that travel (never an unplugged block), and stop once they can be
   sent within ``downtime-limit`` at the speed the last round of dirty pages read guest
   memory (before any, only a rest of at most 1 MiB) and the destination said it loaded the
   setup, else send them (through a bounce buffer: the guest keeps writing) limited to
   ``max-bandwidth``;
3. switch-over: stop the vCPUs (STOP) and wait until nothing of the guest runs, sync once
   more, send the rest zero-copy and unthrottled, the late states and the guest's STATE
   sections, END; wait for the destination's answer (sockets: it loaded everything and runs),
   then ``completed``. The source stays paused (``postmigrate``).

A failure (the destination died or refused, a socket error) or ``migrate_cancel`` leaves the
source as it was: the devices are no longer busy, dirty logging is off, and vCPUs this job
stopped run again (RESUME). Nothing the source owns is changed by a migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from memslots.errors import MemslotsError, MigrationError
from memslots.host.memory import HostMemory
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory
from memslots.migration.channel import Buffer, Endpoint, FdPassing, FdSink, SocketSink, connect
from memslots.migration.dirty import PAGE_SIZE, DirtyTracker, merge_runs
from memslots.migration.machine import (
    completion_sections,
    ram_blocks,
    ram_ranges,
    section_name,
    send_ranges,
    shared_blocks,
    write_end,
    write_setup,
)
from memslots.migration.status import MigrationCapabilities, MigrationParameters, MigrationStatus
from memslots.migration.stream import StreamWriter
from memslots.options import MigrationUri

log = logging.getLogger("memslots.migration")

Ranges = list[tuple[int, HostMemory, int, int]]
T = TypeVar("T")
#: A round that read less guest memory than this measures its speed too poorly; a rest this
#: small may go in the downtime before any round measured it.
_MIN_MEASURED_BYTES = 1 << 20


class SourceVm(Protocol):
    """What the migration needs from the process that runs the machine."""

    def vcpus_running(self) -> bool:
        """Whether the guest runs (it may have been stopped with QMP ``stop``)."""
        ...

    def stop_vcpus(self) -> None:
        """Stop the guest for the switch-over (STOP; runstate ``finish-migrate``)."""
        ...

    def resume_vcpus(self) -> None:
        """Run the guest again after a failed or cancelled switch-over (RESUME)."""
        ...

    def migrated(self) -> None:
        """The migration completed: the source stays stopped (``postmigrate``)."""
        ...

    def guest_state(self) -> tuple[dict[str, tuple[int, bytes]], dict[str, bytes]]:
        """The guest's STATE sections and each virtio-mem device's virtio state by device id
        (called with the guest stopped)."""
        ...

    def dirty_gpa_ranges(self) -> list[tuple[int, int]]:
        """Guest-physical ranges the VMM writes without a trace (virtqueue rings): the job
        registers them with ``DirtyTracker.add_always_dirty``, so every pass sends them."""
        ...

    def status_changed(self, status: MigrationStatus) -> None:
        """The migration's status changed (QEMU's MIGRATION event)."""
        ...

    def pass_done(self, count: int) -> None:
        """Dirty logs were synced for the ``count``-th time (QEMU's MIGRATION_PASS)."""
        ...

    async def locked(self, fn: Callable[[], T]) -> T:
        """``fn()`` with the machine to itself: no guest request, command or scrape runs
        meanwhile (the guests may run in a thread of their own)."""
        ...

    async def quiesce(self) -> None:
        """After :meth:`stop_vcpus`: wait until nothing of the guest runs any more, so that its
        state can be saved and its last writes are in the dirty logs."""
        ...


def _set_busy(devices: Sequence[tuple[Any, bool]]) -> None:
    for dev, busy in devices:
        dev.busy = busy


class _Cancelled(MigrationError):
    """``migrate_cancel`` stopped the job."""


class _ThrottledSink:
    """The job's sink: refuses to send once the job is cancelled, and keeps the live phase
    within ``max-bandwidth`` (read at every send, so a change applies at once)."""

    def __init__(self, inner: SocketSink | FdSink, job: Outgoing) -> None:
        self.inner = inner
        self.job = job
        self.throttled = True
        self._t0 = time.monotonic()
        self._sent = 0
        self._rate = 0

    def send(self, parts: Sequence[Buffer]) -> None:
        self._before()
        self.inner.send(parts)
        self._after(parts)

    def send_fds(self, parts: Sequence[Buffer], fds: Sequence[int]) -> None:
        if not isinstance(self.inner, FdPassing):
            raise MigrationError("file descriptors can only be passed over a unix: socket")
        self._before()
        self.inner.send_fds(parts, fds)
        self._after(parts)

    def _before(self) -> None:
        if self.job.cancel_requested:
            raise _Cancelled("migration cancelled")
        if self.job.aborted:
            raise MigrationError("the migration was aborted")

    def _after(self, parts: Sequence[Buffer]) -> None:
        if not self.throttled:
            return
        rate = self.job.params.max_bandwidth
        now = time.monotonic()
        if rate != self._rate or (rate and self._t0 + self._sent / rate < now - 1.0):
            # A new limit, or more than a second behind it: no credit is carried over.
            self._t0, self._sent, self._rate = now, 0, rate
        self._sent += sum(memoryview(p).nbytes for p in parts)
        if not rate:
            return
        due = self._t0 + self._sent / rate
        if due > now:
            self.job.wait_cancel(due - now)


class Outgoing:
    """One outgoing migration (see the module docstring); ``await run()`` does it all and
    never raises for the migration's own failures: they end in :attr:`status` ``failed``
    with :attr:`error`."""

    def __init__(
        self,
        machine: Machine,
        uri: MigrationUri,
        params: MigrationParameters,
        caps: MigrationCapabilities,
        vm: SourceVm,
    ) -> None:
        self.machine = machine
        self.uri = uri
        self.params = params
        self.caps = MigrationCapabilities(caps.events, caps.x_ignore_shared)
        self.vm = vm
        self.status = MigrationStatus.SETUP
        self.error: str | None = None
        self.started = time.time()
        self._t0 = time.monotonic()
        self.setup_ms = 0
        self.total_ms: int | None = None
        self.downtime_ms: int | None = None
        self.expected_downtime_ms = 0
        self.dirty_sync_count = 0
        self.mbps = 0.0
        self.pages_per_second = 0
        self.dirty_pages_rate = 0
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        #: Every page a round re-sent because it was written again after it was sent.
        self.resent_bytes = 0
        self.ram_total = 0
        self.ignored: set[str] = set()
        self._cancel = threading.Event()
        self._abort = threading.Event()
        self._worker: asyncio.Future[Any] | None = None
        self._endpoint: Endpoint | None = None
        self._writer: StreamWriter | None = None
        self._sink: _ThrottledSink | None = None
        self._tracker = DirtyTracker()
        self._plugged: dict[int, list[tuple[int, int]]] = {}
        self._pass_bytes = 0
        self._pass_base = 0
        #: Bytes of guest memory per second: a round of dirty pages, the full pass.
        self._bandwidth = 0.0
        self._full_rate = 0.0
        self._last_sync = time.monotonic()
        self._stopped_vcpus = False
        #: The destination loaded the setup (its "ready" came).
        self._ready = False

    # -- control -----------------------------------------------------------------------------

    @property
    def cancel_requested(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancel.is_set()

    @property
    def aborted(self) -> bool:
        """True once the job's task was cancelled (the process is shutting down)."""
        return self._abort.is_set()

    def wait_cancel(self, seconds: float) -> None:
        """Sleep (in the worker thread) unless cancelled meanwhile."""
        self._cancel.wait(seconds)

    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run ``fn`` in a worker thread. If the task is cancelled meanwhile, the worker is
        made to stop and awaited, so nothing reads guest memory once the task is gone."""
        loop = asyncio.get_running_loop()
        self._worker = loop.run_in_executor(None, functools.partial(fn, *args, **kw))
        try:
            return await asyncio.shield(self._worker)
        except asyncio.CancelledError:
            self._abort.set()
            self._cancel.set()  # wakes a throttled worker
            if self._endpoint is not None:
                self._endpoint.shutdown()
            await asyncio.gather(self._worker, return_exceptions=True)
            raise

    def cancel(self) -> None:
        """``migrate_cancel``: stop at once; the source goes on as before."""
        if not self.status.running or self._cancel.is_set():
            return
        self._cancel.set()
        self._set_status(MigrationStatus.CANCELLING)
        if self._endpoint is not None:
            self._endpoint.shutdown()  # blocking I/O in the worker fails now

    def _set_status(self, status: MigrationStatus) -> None:
        self.status = status
        self.vm.status_changed(status)

    # -- the job -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Migrate; ends ``completed``, ``failed`` or ``cancelled``."""
        m = self.machine
        busy = [(d, d.busy) for d in m.virtio_mem_devices]
        self.vm.status_changed(MigrationStatus.SETUP)
        try:
            self._endpoint = await connect(self.uri)
            if self._cancel.is_set():
                raise _Cancelled("migration cancelled")
            await self.vm.locked(lambda: _set_busy([(dev, True) for dev, _ in busy]))
            await self._setup()
            self._set_status(MigrationStatus.ACTIVE)
            await self._switch_over(await self._precopy())
            self.total_ms = self._ms_since(self._t0)
            self._set_status(MigrationStatus.COMPLETED)
            self.vm.migrated()
        except asyncio.CancelledError:
            self._abort.set()
            self._failed("the migration was aborted: the process is shutting down")
            raise
        except (MemslotsError, OSError) as exc:
            reason = None
            if not self._cancel.is_set():
                reason = await asyncio.to_thread(self._destination_error)
            self._failed(reason or str(exc))
        except BaseException as exc:
            self._failed(f"internal error: {exc!r}")
            raise
        finally:

            def restore() -> None:
                with contextlib.suppress(MemslotsError):
                    m.kvm.stop_dirty_log()
                self._tracker.close()
                _set_busy(busy)

            await self.vm.locked(restore)
            if self._endpoint is not None:
                self._endpoint.shutdown()  # a worker still blocked on it gives up
                self._endpoint.close()

    def _failed(self, reason: str) -> None:
        if self._cancel.is_set() and not self._abort.is_set():
            self.total_ms = self._ms_since(self._t0)
            self._set_status(MigrationStatus.CANCELLED)
        else:
            self.error = reason
            log.error("migration to %s failed: %s", self.uri, reason)
            self._set_status(MigrationStatus.FAILED)
        if self._stopped_vcpus:
            self._stopped_vcpus = False
            self.vm.resume_vcpus()

    def _destination_error(self) -> str | None:
        """Why the destination gave up, if it said so before it hung up."""
        ep = self._endpoint
        if ep is None or not ep.has_result or self._writer is None:
            return None
        try:
            reason = ep.read_result(timeout=1.0)
        except MemslotsError:
            return None
        return None if reason is None else f"the destination failed: {reason}"

    async def _setup(self) -> None:
        m = self.machine
        if self.caps.x_ignore_shared:
            self.ignored = shared_blocks(m)
            if self.ignored and self.uri.transport != "unix":
                raise MigrationError(
                    "x-ignore-shared hands shared memory over by file descriptor: it needs a "
                    f"unix: URI, not '{self.uri}'"
                )
        assert self._endpoint is not None
        self._sink = _ThrottledSink(self._endpoint.sink(), self)
        self._writer = StreamWriter(self._sink)
        sent = [
            block
            for block_id, block in ram_blocks(m)
            if block_id not in self.ignored and isinstance(block, HostMemory)
        ]
        self.ram_total = sum(b.size for b in sent)
        for index, _, offset, length in ram_ranges(m, self.ignored):
            self._plugged.setdefault(index, []).append((offset, offset + length))
        await self._in_thread(write_setup, m, self._writer, self.ignored)

        def start_logging() -> None:
            for block in sent:
                self._tracker.track(block)
            guest = GuestMemory(m.address_space)
            for gpa, length in self.vm.dirty_gpa_ranges():
                for section, offset, n in guest.ranges(gpa, length):
                    if isinstance(section.backend, HostMemory) and section.backend in sent:
                        self._tracker.add_always_dirty(section.backend, offset, n)
            logged = {id(b) for b in sent}
            m.kvm.start_dirty_log(lambda section: id(section.backend) in logged)
            self._collect_dirty()  # the first sync reports everything: the full pass sends it

        await self.vm.locked(start_logging)
        self.setup_ms = self._ms_since(self._t0)

    async def _precopy(self) -> Ranges:
        """The full pass, then rounds until what is dirty fits the downtime; returns those
        dirty pages (the switch-over sends them with what the guest writes until it stops)."""
        ranges = ram_ranges(self.machine, self.ignored)
        await self._send(ranges, full=True)
        while True:
            dirty = await self.vm.locked(self._collect_dirty)
            remaining = sum(r[3] for r in dirty)
            bandwidth = self._estimated_bandwidth()
            self.expected_downtime_ms = int(remaining / bandwidth * 1000)
            self._pass_bytes, self._pass_base = remaining, self._pages_done()
            # Until a round of dirty pages measured how fast such pages go (scattered pages
            # cost a record each; the full pass read long runs), only a small rest may go
            # in the downtime.
            fits = remaining <= bandwidth * self.params.downtime_limit / 1000
            measured = self._bandwidth or remaining <= _MIN_MEASURED_BYTES
            # A destination still mapping its memslots would make the downtime wait for it:
            # after waiting for it, these pages go live and the next round decides afresh.
            if fits and measured and await self._destination_ready():
                return dirty
            self.resent_bytes += remaining
            await self._send(dirty)

    async def _destination_ready(self) -> bool:
        """Whether the destination had said it loaded the setup; else wait until it does and
        say False (QEMU's switchover-ack, always on here). A file has no return path: always
        ready."""
        if self._ready:
            return True
        assert self._endpoint is not None
        if self._endpoint.has_result:
            await self._in_thread(self._endpoint.read_ready)
        self._ready = True
        return not self._endpoint.has_result

    async def _switch_over(self, pending: Ranges) -> None:
        assert self._writer is not None and self._sink is not None
        writer = self._writer
        self.precopy_bytes = writer.stats.bytes
        if self.vm.vcpus_running():
            self.vm.stop_vcpus()
            self._stopped_vcpus = True
        # The guest runs until its thread is idle (a pass or workload tick runs to its end):
        # the downtime starts when it really stopped.
        await self.vm.quiesce()
        downtime_start = time.monotonic()

        def last_state() -> tuple[Ranges, Any]:
            final = _merged(pending + self._collect_dirty())
            states, virtio = self.vm.guest_state()
            by_section = {
                section_name(d): virtio[d.id]
                for d in self.machine.virtio_mem_devices
                if d.id is not None and d.id in virtio
            }
            return final, completion_sections(self.machine, states=states, virtio=by_section)

        final, sections = await self.vm.locked(last_state)
        self.resent_bytes += sum(r[3] for r in final)
        self._sink.throttled = False

        def finish() -> None:
            send_ranges(writer, final, stable=True)
            write_end(writer, sections)

        await self._in_thread(finish)
        self.downtime_bytes = writer.stats.bytes - self.precopy_bytes
        assert self._endpoint is not None
        if self._endpoint.has_result:
            reason = await self._in_thread(self._endpoint.read_result)
            if reason is not None:
                raise MigrationError(f"the destination failed: {reason}")
        self.downtime_ms = self._ms_since(downtime_start)
        self._stopped_vcpus = False

    async def _send(self, ranges: Ranges, *, full: bool = False) -> None:
        """One round through the worker thread; a round of dirty pages (not the ``full``
        pass) measures how fast they go."""
        assert self._writer is not None
        writer = self._writer
        self._pass_bytes = sum(r[3] for r in ranges)
        self._pass_base = self._pages_done()
        t0, sent0, holes0 = time.monotonic(), writer.stats.bytes, writer.stats.hole_pages
        await self._in_thread(send_ranges, writer, ranges, stable=False)
        elapsed = max(time.monotonic() - t0, 1e-6)
        wire = writer.stats.bytes - sent0
        pages = self._pages_done() - self._pass_base
        read = pages - (writer.stats.hole_pages - holes0)
        self.mbps = round(wire * 8 / elapsed / 1e6, 3)
        self.pages_per_second = int(pages / elapsed)
        # The switch-over reads and sends the dirty pages as a round does: its time is what a
        # round took per byte of guest memory it read. On the wire alone, zero pages would
        # count as free and a mostly empty first pass would make every later round look slow;
        # holes (found without reading) would make it look fast.
        rate = read * PAGE_SIZE / elapsed
        if full:
            self._full_rate = rate
        elif read * PAGE_SIZE >= _MIN_MEASURED_BYTES:
            self._bandwidth = rate

    def _estimated_bandwidth(self) -> float:
        limit = self.params.max_bandwidth or float("inf")
        measured = self._bandwidth or self._full_rate or limit
        return max(1.0, min(measured, limit))

    def _pages_done(self) -> int:
        stats = self._writer.stats if self._writer is not None else None
        return 0 if stats is None else stats.normal_pages + stats.zero_pages

    # -- dirty pages -------------------------------------------------------------------------

    def _collect_dirty(self) -> Ranges:
        """Sync every log; the dirty pages that travel, as send ranges (on the loop)."""
        m = self.machine
        found: dict[int, list[tuple[int, int]]] = {}
        memories: dict[int, HostMemory] = {}

        def add(memory: object, offset: int, length: int) -> None:
            if isinstance(memory, HostMemory):
                memories[id(memory)] = memory
                first = offset // PAGE_SIZE
                end = -(-(offset + length) // PAGE_SIZE)
                found.setdefault(id(memory), []).append((first, end))

        for slot in m.kvm.sync_dirty_log():
            for offset, length in slot.backend_ranges():
                add(slot.section.backend, offset, length)
        for memory, ranges in self._tracker.take_all().items():
            for offset, length in ranges:
                add(memory, offset, length)
        now = time.monotonic()
        pages = sum(e - f for runs in found.values() for f, e in merge_runs(runs))
        self.dirty_pages_rate = int(pages / max(now - self._last_sync, 1e-6))
        self._last_sync = now
        self.dirty_sync_count += 1
        self.vm.pass_done(self.dirty_sync_count)
        return self._travelling(found, memories)

    def _travelling(
        self, found: dict[int, list[tuple[int, int]]], memories: dict[int, HostMemory]
    ) -> Ranges:
        """Dirty page runs cut to the ranges that travel (plugged blocks, whole boot RAM)."""
        index_of = {
            id(block): index
            for index, (_, block) in enumerate(ram_blocks(self.machine))
            if index in self._plugged
        }
        out: Ranges = []
        for key, runs in found.items():
            index = index_of.get(key)
            if index is None:
                continue  # memory that does not travel (handed over, or not a RAM block)
            memory = memories[key]
            wanted = self._plugged[index]
            i = 0
            for first, end in merge_runs(runs):
                lo, hi = first * PAGE_SIZE, end * PAGE_SIZE
                while i < len(wanted) and wanted[i][1] <= lo:
                    i += 1
                j = i
                while j < len(wanted) and wanted[j][0] < hi:
                    a, b = max(lo, wanted[j][0]), min(hi, wanted[j][1])
                    if a < b:
                        out.append((index, memory, a, b - a))
                    j += 1
        return sorted(out, key=lambda r: (r[0], r[2]))

    # -- query-migrate -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``query-migrate``'s fields for this job, as QEMU 8.2 fills them."""
        status = self.status
        out: dict[str, Any] = {"status": status.value}
        if status in (
            MigrationStatus.ACTIVE,
            MigrationStatus.CANCELLING,
            MigrationStatus.COMPLETED,
        ):
            out["setup-time"] = self.setup_ms
            done = status is MigrationStatus.COMPLETED
            out["total-time"] = self.total_ms if done else self._ms_since(self._t0)
            if done:
                out["downtime"] = self.downtime_ms
            else:
                out["expected-downtime"] = self.expected_downtime_ms
            out["ram"] = self._ram_info(done)
        if self.error is not None:
            out["error-desc"] = self.error
        return out

    def _ram_info(self, done: bool) -> dict[str, Any]:
        stats = self._writer.stats if self._writer is not None else None
        normal = stats.normal_pages if stats is not None else 0
        ram: dict[str, Any] = {
            "transferred": stats.bytes if stats is not None else 0,
            "total": self.ram_total,
            "duplicate": stats.zero_pages if stats is not None else 0,
            "normal": normal,
            "normal-bytes": normal * PAGE_SIZE,
            "mbps": self.mbps,
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": 0,
            "page-size": PAGE_SIZE,
            "multifd-bytes": 0,
            "pages-per-second": self.pages_per_second,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
            # Ours: the RAM bytes of pages sent again after the first pass.
            "x-resent-bytes": self.resent_bytes,
        }
        if not done:
            left = self._pass_bytes - (self._pages_done() - self._pass_base) * PAGE_SIZE
            ram["remaining"] = max(0, left)
            ram["dirty-pages-rate"] = self.dirty_pages_rate
        return ram

    @staticmethod
    def _ms_since(t0: float) -> int:
        return int((time.monotonic() - t0) * 1000)


def _merged(ranges: Ranges) -> Ranges:
    """Send ranges sorted, with overlapping or touching ones of a block joined."""
    out: Ranges = []
    for index, memory, offset, length in sorted(ranges, key=lambda r: (r[0], r[2])):
        if out and out[-1][0] == index and offset <= out[-1][2] + out[-1][3]:
            last = out[-1]
            out[-1] = (index, memory, last[2], max(last[2] + last[3], offset + length) - last[2])
        else:
            out.append((index, memory, offset, length))
    return out
