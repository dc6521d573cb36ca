"""The migration stream: our own format (``docs/migration.md``), a writer and a checking reader.

Layout (all integers little-endian)::

    header   magic "\\x89MSLOTS\\n" | u16 version | u16 checksum kind | u32 page size
             | u64 CRC-32 of the first 16 bytes                                   (24 bytes)
    record   u8 type | u8 flags | u16 a | u32 b | u64 c                            (16 bytes)
             ...body...
             u64 checksum of the record header and its body

Section records (CONFIG, EARLY, LATE, STATE): ``a`` = name length, ``b`` = payload length,
``c`` = the section's own version; the body is the UTF-8 name, then the payload. RAM records:
``a`` = RAM block index (from the CONFIG section), ``b`` = pages, ``c`` = byte offset in the
block; flags ZERO (every page is zero: no body), DATA (every page has data: the body is the
pages) or neither (mixed: a page map of ``ceil(pages / 8)`` bytes, bit set = data page, then the
data pages). END has no body. A record's checksum covers, in order: the 16-byte header, then
the name and payload (sections) or the page map (mixed RAM), then each maximal run of data
pages. The checksum kind is XXH3-64 (:class:`ChecksumKind`, from the ``xxhash`` package, which
runs at memory bandwidth), chained: each part is hashed with the previous value as its seed,
starting from 0. The header itself carries a CRC-32, so that it can be checked before its
checksum kind is believed.

The reader checks everything as it goes (magic, version, each checksum, the order of records,
every bound) and raises :class:`~memslots.errors.MigrationError` naming the record and the
stream offset. It returns a record only once its checksum matched; RAM pages are received
straight into the destination's memory and checked there, so a destination whose load fails
must not run (its loader cancels the load, see :mod:`memslots.migration.machine`).

The writer sends a range of host memory as runs of pages: all-zero runs become one ZERO record
however long (memfd/file holes are found with SEEK_DATA without reading them); other chunks of
up to ``record_pages`` pages are classified by a scan of their first words (C speed), with a
``memcmp`` for the few candidates, and sent with one ``sendmsg`` from guest memory. ``stable``
says the memory cannot change meanwhile (vCPUs stopped): then pages go out zero-copy; otherwise
each chunk is first copied to a bounce buffer, so the checksum matches what is sent even while
the guest writes (the page is dirty again and will be sent again).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import xxhash

from memslots.errors import MemslotsError, MigrationError
from memslots.host.libc import memcmp, memset
from memslots.host.memory import HostMemory
from memslots.migration.channel import Buffer, FdPassing, Sink, Source

MAGIC = b"\x89MSLOTS\n"
VERSION = 1
PAGE_SIZE = 4096
PAGE_SHIFT = 12

_HEADER = struct.Struct("<8sHHI")
_HEADER_CRC = struct.Struct("<Q")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size
_RECORD = struct.Struct("<BBHIQ")
RECORD_SIZE = _RECORD.size
_CHECKSUM = struct.Struct("<Q")

#: Default pages per data record (8 MiB): one sendmsg, one checksum call per run. Measured
#: here, CPU per byte falls up to 2048 pages and is flat beyond.
RECORD_PAGES = 2048
#: Most pages a DATA or mixed record may carry (the reader refuses more).
MAX_RECORD_PAGES = 1 << 16
#: Most pages one ZERO record may describe (its ``b`` field).
MAX_ZERO_PAGES = (1 << 32) - 1
#: Largest section payload the reader accepts.
MAX_SECTION_BYTES = 64 << 20
_SMALL = 64 << 10  # pending small buffers are flushed beyond this
#: Ranges shorter than this are scanned rather than looked up for holes.
_HOLE_LOOKUP_MIN = 64 * PAGE_SIZE


class RecordType(enum.IntEnum):
    """Record types."""

    CONFIG = 0x01
    EARLY = 0x02
    RAM = 0x03
    LATE = 0x04
    STATE = 0x05
    END = 0xFF


SECTION_TYPES = frozenset({RecordType.CONFIG, RecordType.EARLY, RecordType.LATE, RecordType.STATE})


class ChecksumKind(enum.IntEnum):
    """The record checksum of a stream: its number in the stream header (which leaves room for
    other algorithms; this version has one)."""

    XXH3_64 = 2

    @property
    def label(self) -> str:
        """The name messages use."""
        return "xxh3-64"


def _chain(value: int, part: Buffer) -> int:
    """Continue a record's checksum ``value`` over ``part`` (see the module docstring)."""
    return xxhash.xxh3_64_intdigest(part, value)


#: RAM record flags.
RAM_ZERO = 0x01
RAM_DATA = 0x02


# -- memory on both sides ----------------------------------------------------------------------


SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def _memory_view(addr: int, size: int) -> memoryview:
    """A writable byte view of ``size`` bytes of this process's memory at ``addr``."""
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")


class _Zeros:
    """A run of zero bytes at a fixed address, for memcmp: an anonymous mapping that is never
    written, so every page of it is the kernel's shared zero page and costs no memory."""

    def __init__(self, size: int) -> None:
        self._map = mmap.mmap(-1, size)
        self._holder = ctypes.c_char.from_buffer(self._map)
        self.addr = ctypes.addressof(self._holder)
        self.size = size

    def is_zero(self, addr: int, length: int) -> bool:
        """Whether the ``length`` bytes at ``addr`` are all zero."""
        while length:
            n = min(length, self.size)
            if memcmp(addr, self.addr, n):
                return False
            addr += n
            length -= n
        return True


@dataclass
class RamSource:
    """One RAM block on the sending side: its bytes, their address, and where holes are.

    ``holes`` (optional) lists the data extents of ``[offset, offset + length)`` as
    ``(offset, length, is_hole)``; everything else is scanned.
    """

    view: memoryview
    addr: int
    holes: Callable[[int, int], Iterator[tuple[int, int, bool]]] | None = None
    #: Keeps whatever owns the memory alive.
    owner: object = None
    #: Raises if a range is out of reach (protected host memory), before a byte is read.
    check_access: Callable[[int, int], None] | None = None

    @property
    def size(self) -> int:
        """Bytes in the block."""
        return self.view.nbytes

    @classmethod
    def of_memory(cls, memory: HostMemory) -> RamSource:
        """Host memory of a backend, with its holes, sent as zero pages without being read:
        shared fd-backed memory finds them with SEEK_DATA (reading a hole would allocate it),
        private anonymous memory in ``/proc/self/pagemap`` (a page neither present nor
        swapped out was never written, or was discarded: reading it would only map the zero
        page, one fault per page)."""
        fd = memory.fd
        holes = None
        if fd is not None and memory.shared:
            base = memory.fd_offset

            def fd_holes(offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
                return _fd_extents(fd, base, offset, length)

            holes = fd_holes
        elif fd is None and not memory.shared and memory.page_size == PAGE_SIZE:
            addr = memory.host_addr

            def anon_holes(offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
                return _anon_extents(addr, offset, length)

            holes = anon_holes
        return cls(
            _memory_view(memory.host_addr, memory.size),
            memory.host_addr,
            holes,
            check_access=memory.check_access,
        )

    @classmethod
    def of_buffer(cls, buf: bytearray) -> RamSource:
        """A bytearray as a RAM block (tests, benchmarks)."""
        holder = (ctypes.c_char * len(buf)).from_buffer(buf)
        return cls(memoryview(buf), ctypes.addressof(holder), owner=holder)


#: Pages whose pagemap entry is read at a time (512 KiB of entries).
_PAGEMAP_CHUNK = 1 << 16
#: The top byte of a pagemap entry: bit 63 present, bit 62 swapped -> 1 (data), else 0.
_IN_USE = bytes(1 if b & 0xC0 else 0 for b in range(256))
_RUNS = re.compile(rb"\x00+|\x01+")


def _anon_extents(addr: int, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, is_hole)`` pieces of private anonymous memory mapped at ``addr``,
    from this process's page table (``/proc/self/pagemap``). Pages that are present or
    swapped out are data (to be scanned); the others read as zeros. Where the pagemap cannot
    be read, everything is data."""
    pos, end = offset, offset + length
    while pos < end:
        pages = min(end - pos, _PAGEMAP_CHUNK * PAGE_SIZE) // PAGE_SIZE
        # Opened per chunk: a generator left unfinished (a failed send) keeps no file open.
        try:
            with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
                pagemap.seek((addr + pos) // PAGE_SIZE * 8)
                raw = pagemap.read(pages * 8)
        except OSError:
            raw = b""
        if len(raw) != pages * 8:
            yield pos, end - pos, False
            return
        for run in _RUNS.finditer(raw[7::8].translate(_IN_USE)):
            yield pos + run.start() * PAGE_SIZE, len(run[0]) * PAGE_SIZE, run[0][0] == 0
        pos += pages * PAGE_SIZE


def _fd_extents(fd: int, base: int, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, is_hole)`` pieces of ``[offset, offset + length)`` of a file mapped
    from file offset ``base``, from SEEK_DATA/SEEK_HOLE, page aligned."""
    pos, end = offset, offset + length
    while pos < end:
        try:
            data = os.lseek(fd, base + pos, SEEK_DATA) - base
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = end  # no data after pos
        data = min(end, max(pos, data - data % PAGE_SIZE))
        if data > pos:
            yield pos, data - pos, True
            pos = data
            if pos >= end:
                break
        hole = os.lseek(fd, base + pos, SEEK_HOLE) - base
        hole = min(end, -(-hole // PAGE_SIZE) * PAGE_SIZE)
        if hole <= pos:
            hole = min(end, pos + PAGE_SIZE)
        yield pos, hole - pos, False
        pos = hole


@dataclass
class RamTarget:
    """One RAM block on the receiving side: pages are received into ``view``; ``zero`` makes a
    page-aligned range read as zeros (see :meth:`of_memory`)."""

    view: memoryview
    addr: int
    zero: Callable[[int, int], None]
    #: Keeps whatever owns the memory alive.
    owner: object = None
    #: Raises if a range is out of reach (protected host memory), before a byte is written.
    check_access: Callable[[int, int], None] | None = None

    @property
    def size(self) -> int:
        """Bytes in the block."""
        return self.view.nbytes

    @classmethod
    def of_memory(cls, memory: HostMemory) -> RamTarget:
        """Host memory of a backend. Zero pages are given back (``discard``: no memory is
        allocated for them, and untouched memory stays untouched) where that reads back as
        zeros -- 4 KiB pages, not a private mapping of a named file; otherwise they are cleared
        only if they are not zero already."""
        view = _memory_view(memory.host_addr, memory.size)
        addr = memory.host_addr
        discards = memory.page_size == PAGE_SIZE and (
            memory.shared or memory.fd is None or memory.kind == "memfd"
        )

        def zero(offset: int, length: int) -> None:
            if discards:
                memory.discard(offset, length)
            elif not _ZERO_PAGES.is_zero(addr + offset, length):
                memset(addr + offset, 0, length)

        return cls(view, addr, zero, check_access=memory.check_access)

    @classmethod
    def of_buffer(cls, buf: bytearray) -> RamTarget:
        """A bytearray as a RAM block (tests, benchmarks)."""
        view = memoryview(buf)
        holder = (ctypes.c_char * len(buf)).from_buffer(buf)

        def zero(offset: int, length: int) -> None:
            view[offset : offset + length] = bytes(length)

        return cls(view, ctypes.addressof(holder), zero, owner=holder)


_ZERO_PAGES = _Zeros(16 << 20)


# -- writer ----------------------------------------------------------------------------------


@dataclass
class StreamStats:
    """What went through a stream: bytes, records, RAM pages by kind."""

    bytes: int = 0
    records: int = 0
    ram_records: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    #: The zero pages known as holes (SEEK_DATA, pagemap): sent without being read.
    hole_pages: int = 0
    sections: dict[str, int] = field(default_factory=dict)

    @property
    def ram_bytes(self) -> int:
        """Bytes of page data (zero pages carry none)."""
        return self.normal_pages * PAGE_SIZE


class StreamWriter:
    """Writes a stream to a :class:`~memslots.migration.channel.Sink` (see the module docs).

    ``record_pages`` bounds a data record. The writer does not enforce the record order; the
    reader does.
    """

    def __init__(self, sink: Sink, *, record_pages: int = RECORD_PAGES):
        if not 1 <= record_pages <= MAX_RECORD_PAGES:
            raise ValueError(f"record_pages must be in 1..{MAX_RECORD_PAGES}")
        self.sink = sink
        self.kind = ChecksumKind.XXH3_64
        self.record_pages = record_pages
        self.stats = StreamStats()
        self._pending: list[Buffer] = []
        self._pending_bytes = 0
        self._started = False
        self._ended = False
        self._bounce = bytearray(record_pages * PAGE_SIZE)
        self._bounce_holder = (ctypes.c_char * len(self._bounce)).from_buffer(self._bounce)
        self._bounce_addr = ctypes.addressof(self._bounce_holder)
        self._bounce_view = memoryview(self._bounce)
        # How much of the bounce buffer, and of the pending send, the current batch uses.
        self._bounce_fill = 0
        self._batch_bytes = 0
        # A pending run of zero pages: (block, offset, pages).
        self._zero_run: tuple[int, int, int] | None = None

    # -- plumbing

    def _emit(self, part: Buffer) -> None:
        self._pending.append(part)
        n = part.nbytes if isinstance(part, memoryview) else len(part)
        self._pending_bytes += n
        self.stats.bytes += n

    def flush(self) -> None:
        """Send everything queued."""
        if self._pending:
            parts, self._pending, self._pending_bytes = self._pending, [], 0
            self.sink.send(parts)

    def _check_open(self) -> None:
        if not self._started:
            raise MigrationError("migration stream: write_header() first")
        if self._ended:
            raise MigrationError("migration stream: already ended")

    # -- records

    def write_header(self) -> None:
        """The 24-byte stream header."""
        if self._started:
            raise MigrationError("migration stream: the header was already written")
        head = _HEADER.pack(MAGIC, VERSION, int(self.kind), PAGE_SIZE)
        self._emit(head + _HEADER_CRC.pack(zlib.crc32(head)))
        self._started = True

    def write_section(
        self,
        kind: RecordType,
        name: str,
        payload: bytes,
        version: int = 1,
        *,
        fds: Sequence[int] = (),
    ) -> None:
        """A CONFIG, EARLY, LATE or STATE section. ``fds`` (a Unix socket sink only) travel
        with the section's first byte, so the reader has them once it read the section."""
        self._check_open()
        if kind not in SECTION_TYPES:
            raise ValueError(f"{kind!r} is not a section type")
        if fds and not isinstance(self.sink, FdPassing):
            raise MigrationError("file descriptors can only be passed over a unix: socket")
        self._flush_zero_run()
        if fds:
            self.flush()
        raw_name = name.encode()
        if len(raw_name) > 0xFFFF or len(payload) > MAX_SECTION_BYTES:
            raise MigrationError(f"section '{name}' is too large for the stream")
        header = _RECORD.pack(kind, 0, len(raw_name), len(payload), version)
        body = raw_name + payload
        value = _chain(_chain(0, header), body)
        self._emit(header)
        self._emit(body)
        self._emit(_CHECKSUM.pack(value))
        self.stats.records += 1
        self.stats.sections[name] = len(payload)
        if fds:
            assert isinstance(self.sink, FdPassing)
            parts, self._pending, self._pending_bytes = self._pending, [], 0
            self.sink.send_fds(parts, fds)
        elif self._pending_bytes > _SMALL:
            self.flush()

    def write_end(self) -> None:
        """The END record; then everything is flushed."""
        self._check_open()
        self._flush_zero_run()
        header = _RECORD.pack(RecordType.END, 0, 0, 0, 0)
        self._emit(header)
        self._emit(_CHECKSUM.pack(_chain(0, header)))
        self.stats.records += 1
        self._ended = True
        self.flush()

    def write_ram(
        self, block: int, source: RamSource, offset: int, length: int, *, stable: bool = False
    ) -> None:
        """Send ``[offset, offset + length)`` of RAM block ``block`` (page aligned).

        Zero pages become markers; runs of them are merged (also across calls, while they are
        contiguous). ``stable`` means the memory cannot change until this returns.
        """
        self.write_ram_ranges([(block, source, offset, length)], stable=stable)

    def write_ram_ranges(
        self, ranges: Iterable[tuple[int, RamSource, int, int]], *, stable: bool = False
    ) -> None:
        """Send many ``(block, source, offset, length)`` ranges, as :meth:`write_ram` does
        one: small ranges (a round's scattered dirty pages) share a bounce buffer and a
        ``sendmsg`` instead of costing one each. Everything is sent when this returns."""
        self._check_open()
        for block, source, offset, length in ranges:
            self._write_range(block, source, offset, length, stable)
        self._flush_batch()

    def _write_range(
        self, block: int, source: RamSource, offset: int, length: int, stable: bool
    ) -> None:
        if not 0 <= block <= 0xFFFF:
            raise ValueError(f"RAM block index {block} does not fit the stream")
        if offset % PAGE_SIZE or length % PAGE_SIZE or offset < 0 or offset + length > source.size:
            raise ValueError(
                f"RAM range [{offset:#x}, +{length:#x}) is not page aligned inside the block "
                f"of {source.size:#x} bytes"
            )
        if source.check_access is not None:
            try:
                source.check_access(offset, length)
            except MemslotsError as exc:
                raise MigrationError(f"RAM block {block}: cannot send {exc}") from exc
        # Looking holes up costs a system call or two: worth it for ranges, not single pages.
        extents = (
            source.holes(offset, length)
            if source.holes is not None and length >= _HOLE_LOOKUP_MIN
            else [(offset, length, False)]
        )
        chunk = self.record_pages * PAGE_SIZE
        for start, size, hole in extents:
            if hole:
                self._zero_pages(block, start, size >> PAGE_SHIFT)
                self.stats.hole_pages += size >> PAGE_SHIFT
                continue
            for pos in range(start, start + size, chunk):
                n = min(chunk, start + size - pos)
                if stable:
                    if self._batch_bytes + n > chunk:
                        self._flush_batch()
                    self._ram_chunk(block, pos, source.view[pos : pos + n], source.addr + pos)
                else:
                    if self._bounce_fill + n > chunk:
                        self._flush_batch()  # the bounce buffer is reused from its start
                    at = self._bounce_fill
                    ctypes.memmove(self._bounce_addr + at, source.addr + pos, n)
                    self._bounce_fill += n
                    view = self._bounce_view[at : at + n]
                    self._ram_chunk(block, pos, view, self._bounce_addr + at)
                self._batch_bytes += n

    def _flush_batch(self) -> None:
        self.flush()
        self._bounce_fill = 0
        self._batch_bytes = 0

    def _zero_pages(self, block: int, offset: int, pages: int) -> None:
        run = self._zero_run
        if run is not None and run[0] == block and run[1] + (run[2] << PAGE_SHIFT) == offset:
            self._zero_run = (block, run[1], run[2] + pages)
        else:
            self._flush_zero_run()
            self._zero_run = (block, offset, pages)
        self.stats.zero_pages += pages

    def _flush_zero_run(self) -> None:
        run, self._zero_run = self._zero_run, None
        if run is None:
            return
        block, offset, pages = run
        while pages:
            n = min(pages, MAX_ZERO_PAGES)
            header = _RECORD.pack(RecordType.RAM, RAM_ZERO, block, n, offset)
            self._emit(header)
            self._emit(_CHECKSUM.pack(_chain(0, header)))
            self.stats.records += 1
            self.stats.ram_records += 1
            offset += n << PAGE_SHIFT
            pages -= n

    def _ram_chunk(self, block: int, offset: int, view: memoryview, addr: int) -> None:
        npages = view.nbytes >> PAGE_SHIFT
        zeros = zero_pages(view, addr)
        if len(zeros) == npages:
            self._zero_pages(block, offset, npages)
            return
        self._flush_zero_run()
        if zeros:
            flags = 0
            mask = (1 << npages) - 1
            for z in zeros:
                mask &= ~(1 << z)
            page_map = mask.to_bytes((npages + 7) // 8, "little")
        else:
            flags = RAM_DATA
            page_map = b""
        header = _RECORD.pack(RecordType.RAM, flags, block, npages, offset)
        value = _chain(0, header)
        self._emit(header)
        if page_map:
            value = _chain(value, page_map)
            self._emit(page_map)
        runs = [(f << PAGE_SHIFT, (f + n) << PAGE_SHIFT) for f, n in data_runs(npages, zeros)]
        # Checksum the pages while the scan (or the bounce copy) left them in the cache; they
        # cannot change until they are sent (stable memory, or the bounce buffer).
        for lo, hi in runs:
            self._emit(view[lo:hi])
            value = _chain(value, view[lo:hi])
        self._emit(_CHECKSUM.pack(value))
        self.stats.records += 1
        self.stats.ram_records += 1
        self.stats.normal_pages += npages - len(zeros)
        self.stats.zero_pages += len(zeros)


def zero_pages(view: memoryview, addr: int) -> list[int]:
    """Indices of the all-zero 4 KiB pages of ``view`` (the memory at ``addr``).

    The first 64-bit word of every page is read in one C-level pass; only pages whose first
    word is zero are compared in full (``memcmp`` against zeros), a run of such candidates at a
    time (zero pages come in runs), page by page only inside a run that is not all zero.
    """
    npages = view.nbytes >> PAGE_SHIFT
    firsts = view.cast("Q")[:: PAGE_SIZE // 8].tolist()
    candidates = firsts.count(0)
    if not candidates:
        return []
    out: list[int] = []
    i = firsts.index(0)
    while True:
        end = i + 1
        while end < npages and firsts[end] == 0:
            end += 1
        if _ZERO_PAGES.is_zero(addr + (i << PAGE_SHIFT), (end - i) << PAGE_SHIFT):
            out.extend(range(i, end))
        else:
            out.extend(
                p for p in range(i, end) if _ZERO_PAGES.is_zero(addr + (p << PAGE_SHIFT), PAGE_SIZE)
            )
        candidates -= end - i
        if not candidates:
            return out
        i = firsts.index(0, end)


def data_runs(npages: int, zeros: list[int]) -> Iterator[tuple[int, int]]:
    """Maximal runs ``(first, count)`` of data pages among ``npages``, given the sorted zero
    pages."""
    pos = 0
    for z in zeros:
        if z > pos:
            yield pos, z - pos
        pos = z + 1
    if pos < npages:
        yield pos, npages - pos


def map_runs(page_map: bytes, npages: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The data runs and zero runs ``(first, count)`` of a mixed record's page map."""
    value = int.from_bytes(page_map, "little")
    data: list[tuple[int, int]] = []
    zero: list[tuple[int, int]] = []
    pos = 0
    while pos < npages:
        rest = value >> pos
        if rest & 1:
            n = (~rest & (rest + 1)).bit_length() - 1
            data.append((pos, min(n, npages - pos)))
        else:
            n = (rest & -rest).bit_length() - 1 if rest else npages - pos
            zero.append((pos, min(n, npages - pos)))
        pos += n
    return data, zero


# -- reader ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamHeader:
    """A stream's header."""

    version: int
    checksum: ChecksumKind
    page_size: int


@dataclass(frozen=True)
class SectionRecord:
    """A CONFIG, EARLY, LATE or STATE section: its name, its version and its payload."""

    type: RecordType
    name: str
    version: int
    payload: bytes


@dataclass(frozen=True)
class RamRecord:
    """A RAM record, already applied to its target: block, byte offset, pages, data pages."""

    block: int
    offset: int
    pages: int
    data_pages: int


@dataclass(frozen=True)
class EndRecord:
    """The END record."""


Record = SectionRecord | RamRecord | EndRecord

# The order records may come in: each type's phase, which never goes back.
_PHASE = {
    RecordType.CONFIG: 0,
    RecordType.EARLY: 1,
    RecordType.RAM: 2,
    RecordType.LATE: 3,
    RecordType.STATE: 3,
    RecordType.END: 4,
}


class StreamReader:
    """Reads and checks a stream from a :class:`~memslots.migration.channel.Source`.

    :meth:`read_header` first, then :meth:`read_record` until it returns :class:`EndRecord`.
    RAM records need their blocks' targets (:meth:`set_ram_targets`) before the first one.
    """

    def __init__(self, source: Source, *, buffer_size: int = 256 << 10) -> None:
        self.source = source
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        #: Bytes consumed so far (for messages).
        self.offset = 0
        self.stats = StreamStats()
        self.header: StreamHeader | None = None
        self._targets: dict[int, RamTarget] | None = None
        self._phase = -1
        self._ended = False

    # -- input

    def _fill(self, n: int, what: str) -> None:
        """Make at least ``n`` (<= buffer size) bytes available in the buffer."""
        if self._end - self._start >= n:
            return
        if self._start:
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start : self._end]
            self._start, self._end = 0, left
        while self._end < n:
            got = self.source.recv_into(self._view[self._end :])
            if not got:
                self._short(what, n - self._end)
            self._end += got

    def _short(self, what: str, missing: int) -> None:
        raise MigrationError(
            f"migration stream ended early: {missing} more byte(s) of {what} expected at "
            f"offset {self.offset + (self._end - self._start)} (the source stopped or the "
            "stream was cut)"
        )

    def _read(self, n: int, what: str) -> bytes:
        if n <= len(self._buf):
            self._fill(n, what)
            out = bytes(self._view[self._start : self._start + n])
            self._start += n
            self.offset += n
            return out
        out_buf = bytearray(n)
        self._read_into(memoryview(out_buf), what)
        return bytes(out_buf)

    def _read_into(self, view: memoryview, what: str) -> None:
        n = view.nbytes
        have = min(n, self._end - self._start)
        if have:
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
        pos = have
        while pos < n:
            got = self.source.recv_into(view[pos:])
            if not got:
                self.offset += pos
                self._short(what, n - pos)
            pos += got
        self.offset += n

    def _fail(self, what: str, at: int) -> MigrationError:
        return MigrationError(f"corrupt migration stream: {what} (record at offset {at})")

    # -- header and records

    def read_header(self) -> StreamHeader:
        """Read and check the stream header."""
        raw = self._read(HEADER_SIZE, "the stream header")
        magic, version, kind, page_size = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise MigrationError(
                f"not a memslots migration stream: magic {magic!r}, expected {MAGIC!r}"
            )
        (crc,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
        if crc != zlib.crc32(raw[: _HEADER.size]):
            raise MigrationError("corrupt migration stream: the header's checksum does not match")
        if version != VERSION:
            raise MigrationError(
                f"migration stream version {version} is not supported (this build reads "
                f"version {VERSION})"
            )
        if page_size != PAGE_SIZE:
            raise MigrationError(
                f"migration stream page size {page_size} is not supported ({PAGE_SIZE})"
            )
        try:
            checksum = ChecksumKind(kind)
        except ValueError:
            raise MigrationError(f"migration stream: unknown checksum kind {kind}") from None
        self.header = StreamHeader(version, checksum, page_size)
        self.stats.bytes = self.offset
        return self.header

    def set_ram_targets(self, targets: dict[int, RamTarget]) -> None:
        """Where RAM block ``i``'s pages go (by the block indices of the CONFIG section)."""
        self._targets = dict(targets)

    def next_is_ram(self) -> bool:
        """Whether the next record is a RAM record (peeks at its type; a loader checks the RAM
        blocks just before the first page arrives)."""
        self._fill(1, "a record header")
        return bool(self._buf[self._start] == RecordType.RAM)

    def read_record(self) -> Record:
        """The next record, checked; RAM records are applied to their targets."""
        if self.header is None:
            raise MigrationError("migration stream: read_header() first")
        if self._ended:
            raise MigrationError("migration stream: read past the END record")
        at = self.offset
        raw = self._read(RECORD_SIZE, "a record header")
        rtype, flags, a, b, c = _RECORD.unpack(raw)
        try:
            kind = RecordType(rtype)
        except ValueError:
            raise self._fail(
                f"unknown record type {rtype:#x} (or a stream of a newer version)", at
            ) from None
        phase = _PHASE[kind]
        if self._phase < 0 and kind is not RecordType.CONFIG:
            raise self._fail(f"the first record is {kind.name}, not CONFIG", at)
        if phase < self._phase or (kind is RecordType.CONFIG and self._phase >= 0):
            raise self._fail(f"{kind.name} record out of order", at)
        self._phase = phase
        if kind is RecordType.RAM:
            record: Record = self._ram(raw, flags, a, b, c, at)
        elif kind is RecordType.END:
            if flags or a or b or c:
                raise self._fail("END record with non-zero fields", at)
            self._check(_chain(0, raw), "END", at)
            self._ended = True
            record = EndRecord()
        else:
            record = self._section(kind, raw, flags, a, b, c, at)
        self.stats.records += 1
        self.stats.bytes = self.offset
        return record

    def _check(self, value: int, what: str, at: int) -> None:
        (expected,) = _CHECKSUM.unpack(self._read(_CHECKSUM.size, f"the checksum of {what}"))
        if value != expected:
            assert self.header is not None
            raise self._fail(
                f"{what}: {self.header.checksum.label} checksum mismatch (stream says "
                f"{expected:#x}, computed {value:#x})",
                at,
            )

    def _section(
        self,
        kind: RecordType,
        raw: bytes,
        flags: int,
        name_len: int,
        size: int,
        version: int,
        at: int,
    ) -> SectionRecord:
        if flags:
            raise self._fail(f"{kind.name} section with flags {flags:#x}", at)
        if size > MAX_SECTION_BYTES:
            raise self._fail(f"{kind.name} section of {size} bytes is too large", at)
        body = self._read(name_len + size, f"a {kind.name} section")
        value = _chain(_chain(0, raw), body)
        try:
            name = body[:name_len].decode()
        except UnicodeDecodeError:
            name = repr(body[:name_len])
        self._check(value, f"{kind.name} section '{name}'", at)
        if version > 0xFFFFFFFF:
            raise self._fail(f"{kind.name} section '{name}' has version {version}", at)
        self.stats.sections[name] = size
        return SectionRecord(kind, name, version, body[name_len:])

    def _ram(
        self, raw: bytes, flags: int, block: int, pages: int, offset: int, at: int
    ) -> RamRecord:
        if self._targets is None:
            raise self._fail("RAM record before the RAM blocks are known", at)
        target = self._targets.get(block)
        what = f"RAM record (block {block}, offset {offset:#x}, {pages} pages)"
        if target is None:
            raise self._fail(f"{what}: no such RAM block", at)
        if flags not in (0, RAM_ZERO, RAM_DATA):
            raise self._fail(f"{what}: bad flags {flags:#x}", at)
        length = pages << PAGE_SHIFT
        if not pages or offset % PAGE_SIZE or offset + length > target.size:
            raise self._fail(f"{what}: not a page range of the block's {target.size:#x} bytes", at)
        if flags != RAM_ZERO and pages > MAX_RECORD_PAGES:
            raise self._fail(f"{what}: more than {MAX_RECORD_PAGES} pages of data", at)
        if target.check_access is not None:
            # Pages for unplugged memory: the early state says no one may touch them.
            try:
                target.check_access(offset, length)
            except MemslotsError as exc:
                raise self._fail(f"{what}: {exc}", at) from exc
        value = _chain(0, raw)
        if flags == RAM_ZERO:
            self._check(value, what, at)
            target.zero(offset, length)
            self.stats.zero_pages += pages
            self.stats.ram_records += 1
            return RamRecord(block, offset, pages, 0)
        data: list[tuple[int, int]] = [(0, pages)]
        zero: list[tuple[int, int]] = []
        if flags != RAM_DATA:
            page_map = self._read((pages + 7) // 8, f"the page map of a {what}")
            if int.from_bytes(page_map, "little") >> pages:
                raise self._fail(f"{what}: page map has bits beyond its pages", at)
            value = _chain(value, page_map)
            data, zero = map_runs(page_map, pages)
        for first, count in data:
            lo = offset + (first << PAGE_SHIFT)
            part = target.view[lo : lo + (count << PAGE_SHIFT)]
            self._read_into(part, what)
            value = _chain(value, part)
        self._check(value, what, at)
        for first, count in zero:
            target.zero(offset + (first << PAGE_SHIFT), count << PAGE_SHIFT)
        data_pages = sum(count for _, count in data)
        self.stats.normal_pages += data_pages
        self.stats.zero_pages += pages - data_pages
        self.stats.ram_records += 1
        return RamRecord(block, offset, pages, data_pages)
