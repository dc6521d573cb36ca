"""Prometheus metrics of a running machine, read from the machine at every scrape.

:class:`MachineCollector` turns the machine's state into metric families when Prometheus asks,
so nothing has to be updated as the machine changes: virtio-mem request counters (by type and
response, and the BUSY answers while a migration runs), discard and protection failures, guest
memory faults, plugged/requested/region bytes and memslots per device, memslots used/free/max per
consumer (KVM, each vhost back-end), KVM memslot creates and deletes, the device-memory
accounting, and the kernel metadata our memslots cost: the model's figure and, on the real
kernel, the kernel memory measured per VM
(``memslots_kernel_memory_bytes{source="cgroup"|"system"}``, see :mod:`memslots.host.kmem`).
The budget and the kernel metadata come from :mod:`memslots.reports`, whose field names the
metric names repeat (``memslots_consumer_free_memslots`` is ``ConsumerReport.free_memslots``,
``memslots_kernel_memory_model_bytes`` is ``KernelMemoryReport.model_bytes``).
:class:`Metrics` adds request latency histograms (fed through :meth:`Metrics.observe` by the
guest channel) and serves it all over HTTP.

The HTTP endpoint runs in the asyncio loop that runs the QMP server; a scrape reads the machine
holding the machine lock (in the runner's worker, when there is a runner: see
:mod:`memslots.machine.runner`), so it never reads it while a command or a guest request changes
it. It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import MeasurementError, MonitorError
from memslots.host.kmem import KmemMeter, current_or_system_meter
from memslots.machine.machine import Machine
from memslots.machine.runner import MachineRunner
from memslots.reports import budget_report, kernel_metadata_report

log = logging.getLogger("memslots.monitor.metrics")

#: Request types, as ``VirtioMem.requests`` names them.
REQUEST_TYPES = ("plug", "unplug", "unplug_all", "state")
#: Latency buckets: a request takes microseconds without mapping, up to seconds with a big one.
LATENCY_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
DEFAULT_HOST = "127.0.0.1"
_REQUEST_TIMEOUT = 10.0


def _device_label(dev: VirtioMem) -> str:
    return dev.id if dev.id is not None else f"0x{dev.addr:x}"


class MachineCollector(Collector):
    """Reads a machine on every scrape and yields its metric families."""

    def __init__(self, machine: Machine, kmem: KmemMeter | None = None) -> None:
        self.machine = machine
        #: The kernel-memory meter (default: the process's innermost open meter).
        self.kmem = kmem

    def collect(self) -> Iterable[Metric]:
        """The metric families of the machine as it is now."""
        yield from self._virtio_mem()
        yield from self._budget()
        yield from self._kvm()
        yield from self._kernel()

    def _virtio_mem(self) -> Iterable[Metric]:
        labels = ["device"]
        requests = CounterMetricFamily(
            "memslots_virtio_mem_requests",
            "Guest requests handled, by type and response.",
            labels=["device", "type", "response"],
        )
        discard = CounterMetricFamily(
            "memslots_virtio_mem_discard_failures",
            "Unplugged ranges whose host memory could not be given back.",
            labels=labels,
        )
        protect = CounterMetricFamily(
            "memslots_virtio_mem_protect_failures",
            "Ranges that could not be taken out of the guest's reach (or brought back).",
            labels=labels,
        )
        faults = CounterMetricFamily(
            "memslots_virtio_mem_guest_memory_faults",
            "Guest accesses to memory out of its reach (each stopped the VM).",
            labels=labels,
        )
        busy = CounterMetricFamily(
            "memslots_virtio_mem_busy_answers",
            "Plug, unplug and unplug-all requests answered BUSY while a migration ran.",
            labels=labels,
        )
        gauges = {
            "plugged": GaugeMetricFamily(
                "memslots_virtio_mem_plugged_bytes", "Bytes plugged (size).", labels=labels
            ),
            "requested": GaugeMetricFamily(
                "memslots_virtio_mem_requested_bytes", "Requested size in bytes.", labels=labels
            ),
            "region": GaugeMetricFamily(
                "memslots_virtio_mem_region_bytes", "Device region size in bytes.", labels=labels
            ),
            "memslots": GaugeMetricFamily(
                "memslots_virtio_mem_memslots", "Memslots the device is split into.", labels=labels
            ),
            "mapped": GaugeMetricFamily(
                "memslots_virtio_mem_mapped_memslots", "Memslots mapped now.", labels=labels
            ),
        }
        for dev in self.machine.virtio_mem_devices:
            name = _device_label(dev)
            for (kind, response), count in sorted(dev.requests.items()):
                requests.add_metric([name, kind, response], count)
            discard.add_metric([name], dev.discard_failures)
            protect.add_metric([name], dev.protect_failures)
            faults.add_metric([name], dev.guest_faults)
            busy.add_metric([name], dev.busy_answers)
            gauges["plugged"].add_metric([name], dev.size)
            gauges["requested"].add_metric([name], dev.requested_size)
            gauges["region"].add_metric([name], dev.region_size)
            gauges["memslots"].add_metric([name], dev.decided_memslots)
            gauges["mapped"].add_metric([name], dev.mapped_memslots)
        yield requests
        yield discard
        yield protect
        yield faults
        yield busy
        yield from gauges.values()

    def _budget(self) -> Iterable[Metric]:
        budget = budget_report(self.machine)
        families = [
            GaugeMetricFamily(
                f"memslots_consumer_{field}", f"Memslots {doc} per consumer.", labels=["consumer"]
            )
            for field, doc in (
                ("max_memslots", "supported"),
                ("used_memslots", "in use"),
                ("free_memslots", "free"),
            )
        ]
        for c in budget.consumers:
            for family, value in zip(
                families, (c.max_memslots, c.used_memslots, c.free_memslots), strict=True
            ):
                family.add_metric([c.name], value)
        yield from families
        dm = budget.device_memory
        if dm is None:
            return
        for field, value, doc in (
            ("required_memslots", dm.required_memslots, "promised to plugged memory devices"),
            ("used_memslots", dm.used_memslots, "mapped by memory devices"),
            ("reserved_memslots", dm.reserved_memslots, "promised but not mapped yet"),
        ):
            yield GaugeMetricFamily(
                f"memslots_device_memory_{field}", f"Memslots {doc}.", value=value
            )
        yield GaugeMetricFamily(
            "memslots_device_memory_used_space_bytes",
            "Device-memory space taken by plugged memory devices.",
            value=dm.used_space,
        )

    def _kvm(self) -> Iterable[Metric]:
        kvm = self.machine.kvm
        yield CounterMetricFamily(
            "memslots_kvm_memslot_creates", "KVM memslots created.", value=kvm.creates
        )
        yield CounterMetricFamily(
            "memslots_kvm_memslot_deletes", "KVM memslots deleted.", value=kvm.deletes
        )

    def _kernel(self) -> Iterable[Metric]:
        kmem = self._meter() if self.machine.vm.is_real else None
        try:
            report = kernel_metadata_report(self.machine, kmem=kmem)
        except MeasurementError as exc:
            log.warning("metrics: %s", exc)
            report = kernel_metadata_report(self.machine)
        yield GaugeMetricFamily(
            "memslots_kernel_metadata_model_bytes",
            "Kernel metadata our KVM memslots cost, as the model predicts.",
            value=report.model_bytes,
        )
        measured = report.kernel_memory
        if measured is None:
            return
        for field, value, doc in (
            (
                "bytes",
                measured.bytes,
                "Kernel memory charged to this VM's memory cgroup since start (source=cgroup), "
                "or the rise of the host's VmallocUsed (source=system: other processes move it).",
            ),
            (
                "model_bytes",
                measured.model_bytes,
                "What the model predicts our KVM memslots charge to that source.",
            ),
        ):
            family = GaugeMetricFamily(f"memslots_kernel_memory_{field}", doc, labels=["source"])
            family.add_metric([measured.source], value)
            yield family

    def _meter(self) -> KmemMeter:
        if self.kmem is None:
            self.kmem = current_or_system_meter()
        return self.kmem


class Metrics:
    """The Prometheus registry of a running machine and its HTTP endpoint.

    With a ``runner``, scrapes read the machine in its worker thread (holding the machine lock).
    """

    def __init__(
        self, machine: Machine, kmem: KmemMeter | None = None, runner: MachineRunner | None = None
    ) -> None:
        self.runner = runner
        self.registry = CollectorRegistry()
        self.registry.register(MachineCollector(machine, kmem))
        self.request_seconds = Histogram(
            "memslots_virtio_mem_request_duration_seconds",
            "Time from a guest request to its response, by request type.",
            ["type"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        # Every type has a series from the start, so rates do not begin with a gap.
        for kind in REQUEST_TYPES:
            self.request_seconds.labels(type=kind)
        self._server: asyncio.Server | None = None

    def observe(self, kind: str, seconds: float) -> None:
        """Record one request's latency; ``kind`` is one of :data:`REQUEST_TYPES`."""
        self.request_seconds.labels(type=kind).observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

    async def _collect(self) -> bytes:
        if self.runner is None:
            return self.exposition()
        return await self.runner.run(self.exposition)

    async def start(self, port: int, host: str = DEFAULT_HOST) -> tuple[str, int]:
        """Serve ``GET /metrics`` on ``host:port`` in this loop; returns the bound address."""
        try:
            self._server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            raise MonitorError(
                f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        bound = self._server.sockets[0].getsockname()
        log.info("metrics: serving on http://%s:%d/metrics", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif target.split("?", 1)[0] == "/metrics":
                try:
                    status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, await self._collect()
                except MonitorError as exc:  # the machine is shutting down
                    status, ctype, body = "503 Service Unavailable", "text/plain", str(exc).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"see /metrics\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass  # a client that sends no complete request, or leaves, gets no answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
