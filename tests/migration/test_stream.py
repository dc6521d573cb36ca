"""The migration stream: round trips, zero pages, holes, transports, and every way to break it."""

from __future__ import annotations

import itertools
import os
import random
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from memslots.errors import MigrationError
from memslots.host.memory import FileBackend, MemfdBackend, RamBackend
from memslots.migration.channel import (
    BytesSource,
    FdSink,
    FdSource,
    MemorySink,
    SocketSink,
    SocketSource,
)
from memslots.migration.stream import (
    MAGIC,
    RAM_DATA,
    RECORD_SIZE,
    ChecksumKind,
    EndRecord,
    RamRecord,
    RamSource,
    RamTarget,
    RecordType,
    SectionRecord,
    StreamReader,
    StreamWriter,
    data_runs,
    map_runs,
    zero_pages,
)
from memslots.sizes import MiB

PAGE = 4096


def make_pages(kinds: list[int], seed: int = 0) -> bytearray:
    """Pages of the given kinds: 0 zero, 1 one byte set somewhere (maybe past a zero first
    word), 2 random, 3 a zero first word and data at the very end."""
    rnd = random.Random(seed)
    buf = bytearray(len(kinds) * PAGE)
    for i, kind in enumerate(kinds):
        base = i * PAGE
        if kind == 1:
            buf[base + rnd.randrange(PAGE)] = rnd.randrange(1, 256)
        elif kind == 2:
            buf[base : base + PAGE] = rnd.randbytes(PAGE)
        elif kind == 3:
            buf[base + PAGE - 1] = 1
    return buf


def read_all(reader: StreamReader) -> list[object]:
    records: list[object] = []
    while True:
        record = reader.read_record()
        records.append(record)
        if isinstance(record, EndRecord):
            return records


def small_stream(src: bytearray | None = None) -> bytes:
    """CONFIG, one EARLY, a few RAM records of each kind, LATE, STATE, END."""
    if src is None:
        src = make_pages([2, 0, 0, 1, 3, 2, 2, 0], seed=5)
    sink = MemorySink()
    w = StreamWriter(sink, record_pages=4)
    w.write_header()
    w.write_section(RecordType.CONFIG, "config", b'{"x": 1}')
    w.write_section(RecordType.EARLY, "virtio-mem/a", b"early", version=3)
    w.write_ram(0, RamSource.of_buffer(src), 0, len(src), stable=True)
    w.write_section(RecordType.LATE, "virtio-mem/a", b"late")
    w.write_section(RecordType.STATE, "guest/a", b"\x00\x01opaque")
    w.write_end()
    return bytes(sink.data)


def load(data: bytes, size: int = 8 * PAGE, chunk: int = 1 << 20) -> tuple[bytearray, list[object]]:
    dst = bytearray(b"\x55" * size)
    reader = StreamReader(BytesSource(data, chunk=chunk), buffer_size=4096)
    reader.read_header()
    reader.set_ram_targets({0: RamTarget.of_buffer(dst)})
    return dst, read_all(reader)


# -- round trips ------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    kinds=st.lists(st.integers(0, 3), min_size=1, max_size=40),
    record_pages=st.integers(1, 9),
    stable=st.booleans(),
    chunk=st.sampled_from([1, 7, 4096, 1 << 20]),
    cuts=st.lists(st.integers(0, 40), max_size=3),
)
def test_any_pages_round_trip(
    kinds: list[int],
    record_pages: int,
    stable: bool,
    chunk: int,
    cuts: list[int],
) -> None:
    src = make_pages(kinds, seed=len(kinds))
    sink = MemorySink()
    w = StreamWriter(sink, record_pages=record_pages)
    w.write_header()
    w.write_section(RecordType.CONFIG, "config", b"{}")
    # Several calls over consecutive ranges: zero runs merge across them.
    bounds = sorted({0, len(kinds), *(min(c, len(kinds)) for c in cuts)})
    source = RamSource.of_buffer(src)
    for lo, hi in itertools.pairwise(bounds):
        w.write_ram(0, source, lo * PAGE, (hi - lo) * PAGE, stable=stable)
    w.write_end()
    assert w.stats.normal_pages + w.stats.zero_pages == len(kinds)
    assert w.stats.zero_pages == kinds.count(0)
    assert w.stats.bytes == len(sink.data)
    dst, records = load(bytes(sink.data), len(src), chunk)
    assert dst == src
    ram = [r for r in records if isinstance(r, RamRecord)]
    assert sum(r.pages for r in ram) == len(kinds)
    assert sum(r.data_pages for r in ram) == len(kinds) - kinds.count(0)
    # Zero pages cost a marker, not a page: at most the data, headers and maps.
    assert len(sink.data) <= w.stats.normal_pages * PAGE + 64 * (len(kinds) + 4)


def test_sections_come_back_with_names_versions_and_payloads() -> None:
    dst, records = load(small_stream())
    sections = [
        (r.type, r.name, r.version, r.payload) for r in records if isinstance(r, SectionRecord)
    ]
    assert sections == [
        (RecordType.CONFIG, "config", 1, b'{"x": 1}'),
        (RecordType.EARLY, "virtio-mem/a", 3, b"early"),
        (RecordType.LATE, "virtio-mem/a", 1, b"late"),
        (RecordType.STATE, "guest/a", 1, b"\x00\x01opaque"),
    ]
    assert dst == make_pages([2, 0, 0, 1, 3, 2, 2, 0], seed=5)


def test_long_zero_runs_are_one_record() -> None:
    src = bytearray(300 * PAGE)
    src[150 * PAGE] = 1
    sink = MemorySink()
    w = StreamWriter(sink, record_pages=8)
    w.write_header()
    w.write_section(RecordType.CONFIG, "config", b"{}")
    w.write_ram(0, RamSource.of_buffer(src), 0, len(src), stable=False)
    w.write_end()
    _, records = load(bytes(sink.data), len(src))
    ram = [(r.offset // PAGE, r.pages, r.data_pages) for r in records if isinstance(r, RamRecord)]
    assert ram == [(0, 144, 0), (144, 8, 1), (152, 148, 0)]


def test_page_classification_helpers() -> None:
    src = make_pages([0, 1, 2, 3, 0, 0])
    source = RamSource.of_buffer(src)
    assert zero_pages(source.view, source.addr) == [0, 4, 5]
    assert zero_pages(source.view[PAGE : 4 * PAGE], source.addr + PAGE) == []
    assert list(data_runs(6, [0, 4, 5])) == [(1, 3)]
    assert list(data_runs(3, [])) == [(0, 3)]
    assert map_runs(bytes([0b0110]), 6) == ([(1, 2)], [(0, 1), (3, 3)])


def test_socket_transport_in_both_modes() -> None:
    src = make_pages([2, 1, 0, 3] * 300, seed=9)
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            w = StreamWriter(SocketSink(a), record_pages=64)
            w.write_header()
            w.write_section(RecordType.CONFIG, "config", b"{}")
            source = RamSource.of_buffer(src)
            w.write_ram(0, source, 0, len(src), stable=True)
            w.write_ram(0, source, 0, len(src), stable=False)
            w.write_end()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            a.close()

    t = threading.Thread(target=send)
    t.start()
    try:
        dst = bytearray(len(src))
        reader = StreamReader(SocketSource(b))
        assert reader.read_header().checksum is ChecksumKind.XXH3_64
        reader.set_ram_targets({0: RamTarget.of_buffer(dst)})
        read_all(reader)
    finally:
        t.join()
        b.close()
    assert not errors and dst == src
    assert reader.stats.normal_pages == 2 * 900 and reader.stats.zero_pages == 2 * 300


def test_file_transport(tmp_path: Path) -> None:
    data = small_stream()
    path = tmp_path / "snapshot"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        FdSink(fd).send([data[:10], memoryview(data)[10:]])
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        dst = bytearray(8 * PAGE)
        reader = StreamReader(FdSource(fd), buffer_size=4096)
        reader.read_header()
        reader.set_ram_targets({0: RamTarget.of_buffer(dst)})
        assert isinstance(read_all(reader)[-1], EndRecord)
    finally:
        os.close(fd)


# -- host memory on both sides ----------------------------------------------------------------


def test_memfd_holes_are_sent_as_zero_pages_without_reading_them() -> None:
    with MemfdBackend("src", 64 * MiB, share=True) as mem:
        mem.write(8 * MiB + 4096, b"data")
        mem.write(40 * MiB, b"more")
        allocated = mem.allocated_bytes()
        sink = MemorySink()
        w = StreamWriter(sink)
        w.write_header()
        w.write_section(RecordType.CONFIG, "config", b"{}")
        w.write_ram(0, RamSource.of_memory(mem), 0, mem.size, stable=True)
        w.write_end()
        assert mem.allocated_bytes() == allocated  # no hole was read (it would allocate)
        assert w.stats.normal_pages == 2
        with RamBackend("dst", 64 * MiB, reserve=False) as dst:
            dst.write(0, b"\xff" * 8192)  # stale data where the source has a hole
            reader = StreamReader(BytesSource(bytes(sink.data)))
            reader.read_header()
            reader.set_ram_targets({0: RamTarget.of_memory(dst)})
            read_all(reader)
            assert dst.read(0, 8192) == bytes(8192)
            assert dst.read(8 * MiB + 4096, 4) == b"data" and dst.read(40 * MiB, 4) == b"more"
            # Zero pages were given back, never written: only the data pages are resident.
            assert dst.resident_bytes() <= 2 * 2 * MiB


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_zero_pages_clear_stale_data_in_any_target(kind: str, tmp_path: Path) -> None:
    src = make_pages([2, 0, 2, 0])
    data = bytearray()
    sink = MemorySink()
    w = StreamWriter(sink)
    w.write_header()
    w.write_section(RecordType.CONFIG, "config", b"{}")
    w.write_ram(0, RamSource.of_buffer(src), 0, len(src))
    w.write_end()
    data = sink.data
    if kind == "memfd":
        mem: MemfdBackend | FileBackend = MemfdBackend("dst", 2 * MiB, share=False)
    else:
        path = tmp_path / "ram"
        path.write_bytes(b"\x77" * (2 * MiB))
        mem = FileBackend("dst", 2 * MiB, str(path), share=False)
    with mem:
        mem.write(0, b"\x66" * (4 * PAGE))
        reader = StreamReader(BytesSource(bytes(data)))
        reader.read_header()
        reader.set_ram_targets({0: RamTarget.of_memory(mem)})
        read_all(reader)
        assert mem.read(0, 4 * PAGE) == bytes(src)


# -- broken streams ---------------------------------------------------------------------------


def test_every_truncation_is_a_clear_error() -> None:
    data = small_stream()
    for cut in range(len(data)):
        with pytest.raises(MigrationError, match="ended early") as info:
            load(data[:cut], chunk=997)
        assert "expected at offset" in str(info.value)


def flip_positions(data: bytes) -> Iterator[int]:
    """Every byte outside page data, and every 37th byte inside."""
    yield from range(len(data)) if len(data) < 6000 else range(0, len(data), 7)


def test_every_corruption_is_detected() -> None:
    data = small_stream()
    rnd = random.Random(3)
    for pos in flip_positions(data):
        bad = bytearray(data)
        bad[pos] ^= 1 << rnd.randrange(8)
        with pytest.raises(MigrationError):
            load(bytes(bad), chunk=4093)


def header(version: int = 1, kind: int = 2, page: int = PAGE, magic: bytes = MAGIC) -> bytes:
    head = struct.pack("<8sHHI", magic, version, kind, page)
    return head + struct.pack("<Q", zlib.crc32(head))


def record(
    rtype: int, flags: int = 0, a: int = 0, b: int = 0, c: int = 0, body: bytes = b""
) -> bytes:
    """A record checksummed by hand: XXH3-64 of the header, then of the body seeded with it."""
    raw = struct.pack("<BBHIQ", rtype, flags, a, b, c)
    value = xxhash.xxh3_64_intdigest(raw)
    if body:
        value = xxhash.xxh3_64_intdigest(body, value)
    return raw + body + struct.pack("<Q", value)


CONFIG = record(RecordType.CONFIG, a=6, b=2, c=1, body=b"config{}")
END = record(RecordType.END)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a" + bytes(100), "not a memslots migration stream"),
        (header(version=2) + CONFIG + END, "version 2 is not supported"),
        (header(kind=9) + CONFIG + END, "unknown checksum kind 9"),
        (header(kind=1) + CONFIG + END, "unknown checksum kind 1"),
        (header(page=65536) + CONFIG + END, "page size 65536"),
        (header()[:16] + struct.pack("<Q", 1) + CONFIG + END, "header's checksum"),
        (header() + END, "first record is END, not CONFIG"),
        (header() + CONFIG + CONFIG + END, "CONFIG record out of order"),
        (header() + CONFIG + record(0x42) + END, "unknown record type 0x42"),
        (header() + CONFIG + record(RecordType.END, a=1), "END record with non-zero fields"),
        (
            header()
            + CONFIG
            + record(RecordType.LATE, a=1, b=0, body=b"x")
            + record(RecordType.EARLY, a=1, b=0, body=b"y")
            + END,
            "EARLY record out of order",
        ),
        (
            header()
            + CONFIG
            + record(RecordType.RAM, RAM_DATA, 0, 1, 0, bytes(PAGE))
            + record(RecordType.EARLY, a=1, b=0, body=b"y")
            + END,
            "EARLY record out of order",
        ),
        (header() + CONFIG + record(RecordType.STATE, flags=1) + END, "flags 0x1"),
        (header() + CONFIG + record(RecordType.STATE, b=1 << 30) + END, "too large"),
        (header() + CONFIG + record(RecordType.RAM, 0x3, 0, 1, 0) + END, "bad flags 0x3"),
        (header() + CONFIG + record(RecordType.RAM, 0x1, 7, 1, 0) + END, "no such RAM block"),
        (header() + CONFIG + record(RecordType.RAM, 0x1, 0, 9, 0) + END, "not a page range"),
        (header() + CONFIG + record(RecordType.RAM, 0x1, 0, 1, 100) + END, "not a page range"),
        (header() + CONFIG + record(RecordType.RAM, 0x1, 0, 0, 0) + END, "not a page range"),
        (
            header() + CONFIG + record(RecordType.RAM, 0, 0, 4, 0, b"\xf0") + END,
            "bits beyond its pages",
        ),
    ],
)
def test_malformed_streams(data: bytes, message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        load(data)


def test_reader_refuses_ram_before_targets_and_reads_past_end() -> None:
    data = header() + CONFIG + record(RecordType.RAM, 0x1, 0, 1, 0) + END
    reader = StreamReader(BytesSource(data))
    reader.read_header()
    reader.read_record()
    with pytest.raises(MigrationError, match="before the RAM blocks are known"):
        reader.read_record()
    reader = StreamReader(BytesSource(header() + CONFIG + END))
    with pytest.raises(MigrationError, match="read_header"):
        reader.read_record()
    reader.read_header()
    read_all(reader)
    with pytest.raises(MigrationError, match="past the END"):
        reader.read_record()


def test_writer_refuses_misuse() -> None:
    w = StreamWriter(MemorySink())
    with pytest.raises(MigrationError, match="write_header"):
        w.write_end()
    w.write_header()
    with pytest.raises(MigrationError, match="already"):
        w.write_header()
    with pytest.raises(ValueError, match="not a section type"):
        w.write_section(RecordType.RAM, "x", b"")
    with pytest.raises(ValueError, match="page aligned"):
        w.write_ram(0, RamSource.of_buffer(bytearray(PAGE)), 1, PAGE)
    with pytest.raises(ValueError, match="page aligned"):
        w.write_ram(0, RamSource.of_buffer(bytearray(PAGE)), 0, 2 * PAGE)
    w.write_end()
    with pytest.raises(MigrationError, match="already ended"):
        w.write_section(RecordType.STATE, "x", b"")


def test_record_header_size_is_part_of_the_format() -> None:
    assert RECORD_SIZE == 16 and len(header()) == 24
