"""Migration stream throughput against a raw socket copy of the same RAM, in the same run.

A sender process (forked) moves ``--size`` bytes of anonymous guest RAM to the receiver
(this process) over a loopback socket, two ways, alternately, ``--repeat`` times each:

* ``raw``: ``sendall`` of 4 MiB slices / ``recv_into`` the destination memory -- the plain
  copy of the same RAM bytes, no framing, no checks -- with the kernel's default socket
  buffers and again with 4 MiB ones (``raw_4m``); the ratio is against the faster of the two;
* ``stream``: :class:`~memslots.migration.stream.StreamWriter` (header, CONFIG, the RAM as page
  runs with zero-page detection and a checksum per record, END) into
  :class:`~memslots.migration.stream.StreamReader`, which checks every record and receives
  the pages straight into the destination memory.

Scenarios vary the transport (AF_UNIX socketpair, TCP loopback), whether the source memory is
``stable`` (vCPUs stopped: pages are sent zero-copy) or live (each 8 MiB chunk goes through a
bounce buffer first, so its checksum matches what is sent while the guest writes), and the share
of zero pages. Every record is checksummed with XXH3-64 (the ``xxhash`` package). Throughput is
RAM bytes moved per second (zero pages count: they are RAM the destination now has); the median
of the repeats is reported, and ``ratio`` = stream / raw of the same scenario. Results go to
``bench/results/migration_stream.{json,md}``.

    .venv/bin/python bench/migration_stream.py [--size 1G] [--repeat 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import hostinfo

from memslots.host.libc import madvise, memcmp
from memslots.host.memory import RamBackend
from memslots.migration.channel import SocketSink, SocketSource, size_socket_buffer
from memslots.migration.stream import (
    EndRecord,
    RamSource,
    RamTarget,
    RecordType,
    StreamReader,
    StreamWriter,
)
from memslots.sizes import MiB, format_size, parse_size

CHUNK = 4 * MiB
BIG_BUFFER = 4 * MiB
RECORD_PAGES = [2048]
ZERO_RUN = 64 * 1024  # zero pages come in runs of this size in the mixed scenario


@dataclass(frozen=True)
class Scenario:
    """One row: transport, stable or live source memory, share of zero pages."""

    name: str
    transport: str = "unix"
    stable: bool = True
    zero_share: float = 0.0


def scenarios() -> list[Scenario]:
    return [
        Scenario("unix, stable"),
        Scenario("unix, live (bounce buffer)", stable=False),
        Scenario("tcp, stable", transport="tcp"),
        Scenario("unix, stable, 50% zero pages", zero_share=0.5),
    ]


def fill(mem: RamBackend, zero_share: float) -> None:
    """Random data, with every other ZERO_RUN left zero when ``zero_share`` is 0.5."""
    pattern = os.urandom(CHUNK)
    for off in range(0, mem.size, CHUNK):
        n = min(CHUNK, mem.size - off)
        mem.write(off, pattern[:n])
    if zero_share:
        step = int(ZERO_RUN / zero_share)
        for off in range(0, mem.size, step):
            mem.write(off, bytes(min(ZERO_RUN, mem.size - off)))


def socket_pair(transport: str) -> tuple[socket.socket, socket.socket]:
    if transport == "unix":
        return socket.socketpair()
    server = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(server.getsockname())
    receiver, _ = server.accept()
    server.close()
    return sender, receiver


def timed_transfer(
    transport: str,
    send: Callable[[socket.socket], None],
    receive: Callable[[socket.socket], None],
) -> tuple[float, float, float]:
    """Fork a sender; time the receiver from the go signal until everything is in.

    Returns wall seconds, the sender's CPU seconds and the receiver's CPU seconds.
    """
    sender, receiver = socket_pair(transport)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:  # the sender
        status = 1
        try:
            receiver.close()
            if sender.recv(1) == b"g":
                send(sender)
                status = 0
        finally:
            sender.close()
            os._exit(status)
    sender.close()
    try:
        receiver.sendall(b"g")
        t0 = time.perf_counter()
        c0 = time.process_time()
        receive(receiver)
        elapsed = time.perf_counter() - t0
        receiver_cpu = time.process_time() - c0
    finally:
        receiver.close()
        _, status = os.waitpid(pid, 0)
    if status:
        raise RuntimeError(f"the sender failed (status {status})")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sender_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, sender_cpu, receiver_cpu


def raw_send(src: RamBackend, big: bool) -> Callable[[socket.socket], None]:
    view = RamSource.of_memory(src).view

    def send(sock: socket.socket) -> None:
        if big:
            size_socket_buffer(sock, socket.SO_SNDBUF, BIG_BUFFER)
        for off in range(0, src.size, CHUNK):
            sock.sendall(view[off : off + CHUNK])

    return send


def raw_receive(dst: RamBackend, big: bool) -> Callable[[socket.socket], None]:
    view = RamTarget.of_memory(dst).view

    def receive(sock: socket.socket) -> None:
        if big:
            size_socket_buffer(sock, socket.SO_RCVBUF, BIG_BUFFER)
        got = 0
        while got < dst.size:
            n = sock.recv_into(view[got:], dst.size - got)
            if not n:
                raise RuntimeError("raw copy ended early")
            got += n

    return receive


def stream_send(src: RamBackend, sc: Scenario) -> Callable[[socket.socket], None]:
    def send(sock: socket.socket) -> None:
        w = StreamWriter(SocketSink(sock), record_pages=RECORD_PAGES[0])
        w.write_header()
        w.write_section(RecordType.CONFIG, "config", b"{}")
        w.write_ram(0, RamSource.of_memory(src), 0, src.size, stable=sc.stable)
        w.write_end()

    return send


def stream_receive(dst: RamBackend, stats: list[int]) -> Callable[[socket.socket], None]:
    def receive(sock: socket.socket) -> None:
        reader = StreamReader(SocketSource(sock))
        reader.read_header()
        reader.set_ram_targets({0: RamTarget.of_memory(dst)})
        while not isinstance(reader.read_record(), EndRecord):
            pass
        stats[:] = [reader.stats.bytes, reader.stats.normal_pages, reader.stats.zero_pages]

    return receive


def same_memory(a: RamBackend, b: RamBackend) -> bool:
    return memcmp(a.host_addr, b.host_addr, a.size) == 0


def dont_fork(mem: RamBackend) -> None:
    """Keep ``mem`` out of forked children: a child sharing it copy-on-write would make every
    page the receiver writes fault and copy."""
    madvise(mem.host_addr, mem.size, mmap.MADV_DONTFORK, "MADV_DONTFORK")


def measure(size: int, repeat: int) -> list[dict[str, object]]:
    rows = []
    with RamBackend("src", size) as src, RamBackend("dst", size) as dst:
        dont_fork(dst)
        for sc in scenarios():
            fill(src, sc.zero_share)
            times: dict[str, list[tuple[float, float, float]]] = {
                "raw": [],
                "raw_4m": [],
                "stream": [],
            }
            stats: list[int] = []
            for _ in range(repeat):
                # Every copy writes into fully populated memory (the stream's zero pages give
                # memory back, so populate again each time); the three alternate.
                for kind in times:
                    dst.populate(0, size)
                    if kind == "stream":
                        send, receive = stream_send(src, sc), stream_receive(dst, stats)
                    else:
                        big = kind == "raw_4m"
                        send, receive = raw_send(src, big), raw_receive(dst, big)
                    times[kind].append(timed_transfer(sc.transport, send, receive))
            if not same_memory(src, dst):
                raise RuntimeError(f"{sc.name}: the destination differs from the source")
            gb = size / 1e9
            gbps = {k: gb / statistics.median(t[0] for t in v) for k, v in times.items()}
            cpu = {
                k: (
                    round(statistics.median(t[1] for t in v) / gb, 3),
                    round(statistics.median(t[2] for t in v) / gb, 3),
                )
                for k, v in times.items()
            }
            best_raw = max(gbps["raw"], gbps["raw_4m"])
            rows.append(
                {
                    **asdict(sc),
                    "raw_gbps": round(gbps["raw"], 3),
                    "raw_4m_gbps": round(gbps["raw_4m"], 3),
                    "stream_gbps": round(gbps["stream"], 3),
                    "ratio": round(gbps["stream"] / best_raw, 3),
                    "cpu_s_per_gb": {k: {"sender": c[0], "receiver": c[1]} for k, c in cpu.items()},
                    "stream_bytes": stats[0],
                    "normal_pages": stats[1],
                    "zero_pages": stats[2],
                    "seconds": {k: [round(t[0], 4) for t in v] for k, v in times.items()},
                }
            )
            print(
                f"{sc.name:40} raw {gbps['raw']:5.2f} / {gbps['raw_4m']:5.2f} GB/s  "
                f"stream {gbps['stream']:5.2f} GB/s  ratio {gbps['stream'] / best_raw:5.2f}  "
                f"CPU s/GB raw {cpu['raw'][0]}/{cpu['raw'][1]} stream {cpu['stream'][0]}/"
                f"{cpu['stream'][1]}",
                flush=True,
            )
    return rows


def markdown(rows: list[dict[str, object]], meta: dict[str, str]) -> str:
    lines = [
        "# Migration stream throughput vs a raw socket copy (same run)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Host: {meta['host']}; Python {meta['python']}; {meta['date']}; {meta['size']} of "
        f"anonymous RAM per transfer, median of {meta['repeat']} alternating runs each.",
        "",
        "| scenario | raw copy (GB/s) | raw, 4 MiB socket buffers (GB/s) | stream (GB/s) | "
        "stream / best raw | CPU s/GB raw (send/recv) | CPU s/GB stream (send/recv) | "
        "stream bytes | data pages | zero pages |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = r["cpu_s_per_gb"]
        assert isinstance(cpu, dict)
        raw_cpu, stream_cpu = cpu["raw"], cpu["stream"]
        lines.append(
            f"| {r['name']} | {r['raw_gbps']} | {r['raw_4m_gbps']} | {r['stream_gbps']} | "
            f"{r['ratio']} | {raw_cpu['sender']} / {raw_cpu['receiver']} | "
            f"{stream_cpu['sender']} / {stream_cpu['receiver']} | {r['stream_bytes']} | "
            f"{r['normal_pages']} | {r['zero_pages']} |"
        )
    lines += [
        "",
        "GB/s = RAM bytes moved per second (10^9). raw: sendall of 4 MiB slices into recv_into "
        "the destination memory, nothing else, with the kernel's default socket buffers and "
        "with 4 MiB ones (the ratio is against the faster). stream: the migration stream's "
        "writer and checking reader (kernel default buffers), pages straight from/to guest "
        "memory. live: the source goes through a bounce buffer per 8 MiB record (the guest "
        "may be writing). CPU: seconds of CPU per GB on each side (less sensitive to other load "
        "on the host than the wall clock). In the zero-page scenario "
        "the raw copy still sends every byte; the stream sends a marker per zero run.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="RAM per transfer (default 1G)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each copy per scenario")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--record-pages", type=int, default=None, help="pages per data record")
    args = parser.parse_args()
    size = parse_size(args.size)
    if args.record_pages:
        RECORD_PAGES[0] = args.record_pages
    rows = measure(size, args.repeat)
    meta = {
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "host": hostinfo.describe(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "size": format_size(size),
        "repeat": str(args.repeat),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "migration_stream.json").write_text(
        json.dumps({"meta": meta, "results": rows}, indent=2) + "\n"
    )
    (args.out / "migration_stream.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
