"""Prometheus metrics: read from the machine at scrape time, served over HTTP on loopback."""

from __future__ import annotations

import asyncio

from conftest import requires_kvm, requires_memcg
from kmem_support import Stressor
from prometheus_client.parser import text_string_to_metric_families
from qmp_support import make_machine

from memslots.devices.virtio_mem.wire import ReqType, Request
from memslots.guest.inorder import drive_to
from memslots.machine.machine import Machine
from memslots.monitor.metrics import Metrics
from memslots.sizes import GiB, MiB


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_collector_reads_the_machine_at_scrape_time() -> None:
    with make_machine() as m:
        metrics = Metrics(m)
        before = samples(metrics)
        assert before[("memslots_virtio_mem_plugged_bytes", (("device", "vmem0"),))] == 0
        dev = m.virtio_mem("vmem0")
        drive_to(dev, 3 * GiB)
        dev.handle_request(Request(ReqType.STATE, dev.addr, 1).pack())
        dev.handle_request(Request(ReqType.PLUG, dev.addr, 1).pack())  # beyond requested: NACK
        got = samples(metrics)
        vmem = (("device", "vmem0"),)
        assert got[("memslots_virtio_mem_plugged_bytes", vmem)] == 3 * GiB
        assert got[("memslots_virtio_mem_requested_bytes", vmem)] == 3 * GiB
        assert got[("memslots_virtio_mem_region_bytes", vmem)] == 8 * GiB
        assert got[("memslots_virtio_mem_memslots", vmem)] == 8
        assert got[("memslots_virtio_mem_mapped_memslots", vmem)] == 3
        assert got[("memslots_virtio_mem_discard_failures_total", vmem)] == 0
        assert got[("memslots_virtio_mem_protect_failures_total", vmem)] == 0
        dev.guest_faults = 2  # as GuestVm counts them
        got = samples(metrics)
        assert got[("memslots_virtio_mem_guest_memory_faults_total", vmem)] == 2

        def requests(kind: str, response: str) -> float:
            labels = (("device", "vmem0"), ("response", response), ("type", kind))
            return got[("memslots_virtio_mem_requests_total", labels)]

        assert requests("plug", "ack") == dev.requests[("plug", "ack")] >= 1
        assert requests("plug", "nack") == 1 and requests("state", "ack") == 1
        kvm = (("consumer", "kvm"),)
        assert got[("memslots_consumer_used_memslots", kvm)] == m.kvm.used_memslots
        assert got[("memslots_consumer_max_memslots", kvm)] == m.kvm.max_memslots
        assert got[("memslots_consumer_free_memslots", kvm)] == m.kvm.free_memslots
        assert got[("memslots_device_memory_required_memslots", ())] == 9
        assert got[("memslots_device_memory_used_memslots", ())] == 4
        assert got[("memslots_device_memory_reserved_memslots", ())] == 5
        assert got[("memslots_device_memory_used_space_bytes", ())] == 9 * GiB
        assert got[("memslots_kernel_metadata_model_bytes", ())] == (
            m.kvm.predicted_metadata_bytes()
        )
        # The model is not the kernel: nothing measured to report.
        assert not any(name.startswith("memslots_kernel_memory") for name, _ in got)


def test_kvm_memslot_creates_and_deletes_are_counters() -> None:
    with make_machine() as m:
        metrics = Metrics(m)
        dev = m.virtio_mem("vmem0")
        start = samples(metrics)
        creates, deletes = (
            "memslots_kvm_memslot_creates_total",
            "memslots_kvm_memslot_deletes_total",
        )
        assert start[(creates, ())] == m.kvm.creates >= 1  # boot RAM
        drive_to(dev, 3 * GiB)
        drive_to(dev, GiB)
        got = samples(metrics)
        assert got[(creates, ())] - start[(creates, ())] == 3
        assert got[(deletes, ())] - start[(deletes, ())] == 2


@requires_kvm
@requires_memcg
def test_kernel_memory_per_vm_on_the_kernel(memslot_stressor: Stressor) -> None:
    """On the kernel the metrics carry the VM's kernel memory with its source, next to the
    model's figure for that source; the stressor's memslots are not in it."""
    from qmp_support import DEVICES, MEMORY, OBJECTS

    from memslots.kvm.host import open_vm_meter
    from memslots.options import parse_machine_config

    config = parse_machine_config(MEMORY, OBJECTS, DEVICES, accel="kvm")
    with open_vm_meter() as meter, Machine(config) as m:
        metrics = Metrics(m, meter)
        drive_to(m.virtio_mem("vmem0"), 3 * GiB)
        got = samples(metrics)
        source = (("source", "cgroup"),)
        model = got[("memslots_kernel_memory_model_bytes", source)]
        assert model == m.kvm.predicted_memcg_bytes()
        # The VM itself (its structures, ~100 KiB) comes on top of its memslots.
        assert 0 <= got[("memslots_kernel_memory_bytes", source)] - model < 1 << 20


def test_latency_histograms() -> None:
    with make_machine() as m:
        metrics = Metrics(m)
        for seconds in (20e-6, 300e-6, 2e-3):
            metrics.observe("plug", seconds)
        metrics.observe("unplug", 40e-6)
        got = samples(metrics)
        plug = ("type", "plug")
        name = "memslots_virtio_mem_request_duration_seconds"
        assert got[(f"{name}_count", (plug,))] == 3
        assert abs(got[(f"{name}_sum", (plug,))] - 2.32e-3) < 1e-9
        assert got[(f"{name}_bucket", (("le", "0.0005"), plug))] == 2
        assert got[(f"{name}_count", (("type", "unplug"),))] == 1


async def _get(host: str, port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def test_http_endpoint_on_loopback() -> None:
    async def main(m: Machine) -> None:
        metrics = Metrics(m)
        host, port = await metrics.start(0)
        assert host == "127.0.0.1"
        drive_to(m.virtio_mem("vmem0"), 512 * MiB)
        reply = await _get(host, port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"text/plain; version=" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert b'memslots_virtio_mem_plugged_bytes{device="vmem0"} 5.36870912e+08' in body
        reply = await _get(host, port, b"GET / HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404")
        reply = await _get(host, port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 405")
        reply = await _get(host, port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\n")
        assert await _get(host, port, b"GET /metr") == b""  # incomplete: no answer
        await metrics.close()

    with make_machine() as m:
        asyncio.run(asyncio.wait_for(main(m), 30))
