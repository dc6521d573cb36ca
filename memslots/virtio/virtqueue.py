"""A virtio 1.x split virtqueue in guest RAM: the device's side and a guest driver's side.

Layout (virtio 1.x §2.7, all little-endian; ``num`` is a power of two up to 32768):

* descriptor table, 16-byte aligned: ``num`` entries of ``{le64 addr, le32 len, le16 flags,
  le16 next}``, flags NEXT=1, WRITE=2 (device-writable), INDIRECT=4;
* available ring, 2-byte aligned: ``le16 flags`` (NO_INTERRUPT=1), ``le16 idx``,
  ``le16 ring[num]``, ``le16 used_event``;
* used ring, 4-byte aligned: ``le16 flags`` (NO_NOTIFY=1), ``le16 idx``,
  ``{le32 id, le32 len}[num]``, ``le16 avail_event``.

The device side (:class:`VirtQueue`) treats every byte the guest wrote as hostile and validates
a chain as QEMU's ``virtqueue_split_pop`` does before anyone acts on it; every violation raises
a :class:`VirtQueueError` subclass, which a transport turns into DEVICE_NEEDS_RESET.

Memory access goes through :class:`GuestMemory`'s committed view, as a device's DMA does:
a guest-physical range is resolved to the host memory behind it (QEMU's ``address_space_map``)
and then read and written with :mod:`struct` on a memoryview, because a ctypes call per field
would cost more than the device's whole request. As in QEMU, each ring and each indirect table
must lie in one RAM section (QEMU's "Cannot map desc"); buffers may span sections. Rings are
resolved again whenever the memory map changes (the view tuple is replaced on every commit that
changes it, or when host memory behind them is protected or unprotected), buffers once per
chain. What :meth:`VirtQueue.pop` resolved stays valid until the chain is pushed even if the
request unmaps that memory, like QEMU's mapped iovecs: a request that unplugs the memory holding
its own response or the used ring still completes, and the next pop refuses the ring. Memory
that the request took *out of reach* (a virtio-mem device's unplugged block, ``PROT_NONE``) is
checked before the response or the used entry is written, and refused: a copy into it would
kill the process.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Sequence

from memslots.errors import AddressSpaceError, DeviceError
from memslots.host.memory import HostMemory, last_access_change
from memslots.memory.address_space import GuestMemory, RamBlock
from memslots.sizes import align_up

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
#: QEMU's VIRTQUEUE_MAX_SIZE: a chain may have this many buffers even in a smaller queue
#: (through an indirect table); it also bounds the work a hostile chain can cause.
MAX_CHAIN_BUFFERS = 1024

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def desc_table_size(num: int) -> int:
    """Bytes of a descriptor table of ``num`` entries."""
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    """Bytes of an available ring of ``num`` entries (flags, idx, ring, used_event)."""
    return 6 + 2 * num


def used_ring_size(num: int) -> int:
    """Bytes of a used ring of ``num`` entries (flags, idx, ring, avail_event)."""
    return 6 + 8 * num


class VirtQueueError(DeviceError):
    """The guest broke the virtqueue protocol; the device needs a reset."""


class QueueSetupError(VirtQueueError):
    """Queue size not a power of two in [1, 32768] (or above the device's maximum), or a ring
    misaligned or beyond 64-bit guest-physical space."""


class RingAccessError(VirtQueueError):
    """A ring (descriptor table, available or used ring) is not inside one RAM section."""


class AvailIndexError(VirtQueueError):
    """The available index moved more than the queue size ahead of the device."""


class DescriptorIndexError(VirtQueueError):
    """A head or ``next`` index is beyond the descriptor table."""


class DescriptorLoopError(VirtQueueError):
    """A chain visits more descriptors than its table has (a loop) or has too many buffers."""


class DescriptorOrderError(VirtQueueError):
    """A device-readable descriptor follows a device-writable one."""


class BufferAddressError(VirtQueueError):
    """A buffer has length zero or is not entirely in guest RAM."""


class IndirectDescriptorError(VirtQueueError):
    """An indirect descriptor broke a rule: feature not negotiated, NEXT set, nested, length
    zero or not a multiple of 16, or the table not inside one RAM section."""


class DriverQueueError(VirtQueueError):
    """The guest model's queue cannot do what was asked (full, too small, or a bad used entry)."""


def _host_buffer(backend: RamBlock) -> tuple[memoryview, HostMemory]:
    """All of ``backend``'s host memory as bytes; only mapped host memory has any."""
    if not isinstance(backend, HostMemory) or backend.closed:
        raise AddressSpaceError(f"memory backend '{backend.id}' has no host memory to access")
    array = (ctypes.c_ubyte * backend.size).from_address(backend.host_addr)
    return memoryview(array).cast("B"), backend


class _Span:
    """A buffer ``[gpa, gpa+size)`` resolved to host memory.

    ``buf[off:off+size]`` is the buffer when it is contiguous in host memory (the common case);
    otherwise ``buf`` is None and ``pieces`` lists ``(buffer, offset, bytes)`` in order.
    ``places`` are its ``(memory, offset, bytes)``, for checking that they are still in reach.
    """

    __slots__ = ("buf", "gpa", "off", "pieces", "places", "size")

    def __init__(
        self,
        gpa: int,
        size: int,
        buf: memoryview | None,
        off: int,
        pieces: Sequence[tuple[memoryview, int, int]],
        places: Sequence[tuple[RamBlock, int, int]],
    ) -> None:
        self.gpa = gpa
        self.size = size
        self.buf = buf
        self.off = off
        self.pieces = pieces
        self.places = places

    def check_access(self) -> None:
        """Raise InaccessibleMemoryError if any of it is out of reach now."""
        for memory, offset, n in self.places:
            memory.check_access(offset, n)

    def reachable(self) -> bool:
        """Whether all of it is in reach now."""
        try:
            self.check_access()
        except AddressSpaceError:
            return False
        return True

    def read(self, n: int) -> bytes:
        """The first ``n`` bytes (``n`` is at most ``size``)."""
        if self.buf is not None:
            return bytes(self.buf[self.off : self.off + n])
        out = bytearray()
        for buf, start, size in self.pieces:
            take = min(size, n - len(out))
            out += buf[start : start + take]
            if len(out) == n:
                break
        return bytes(out)

    def write(self, data: bytes) -> None:
        """Copy ``data`` (at most ``size`` bytes) to the start of the buffer."""
        if self.buf is not None:
            self.buf[self.off : self.off + len(data)] = data
            return
        done = 0
        for buf, start, size in self.pieces:
            take = min(size, len(data) - done)
            buf[start : start + take] = data[done : done + take]
            done += take
            if done == len(data):
                break


#: What :meth:`_Dma.sync` found: nothing changed, only protection changed, or the memory map
#: changed (or a backend went away).
_SAME, _REACH, _MAP = 0, 1, 2


class _Dma:
    """Resolves guest-physical ranges through a :class:`GuestMemory` to host memory.

    Resolved buffers are remembered until the memory map changes (or they go out of reach,
    ``PROT_NONE``): drivers reuse their request and response buffers (Linux's virtio_mem has
    one of each), so most lookups are one dict hit.
    :meth:`sync` must be called before each batch of lookups (each pop).
    """

    __slots__ = ("_backends", "_buffers", "_gens", "_seen", "_space", "_view", "memory", "resolved")

    #: Bound on remembered buffers, so that a guest cycling through addresses costs no memory.
    CACHE_SIZE = 256

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._space = memory.address_space
        self._buffers: dict[RamBlock, tuple[memoryview, HostMemory]] = {}
        self._backends: tuple[HostMemory, ...] = ()
        #: The backends' access generations when their buffers were last checked.
        self._gens: tuple[int, ...] = ()
        #: :func:`last_access_change` when ``_gens`` were last found current.
        self._seen = 0
        #: Buffers resolved since the memory map last changed, by ``(gpa, length)``.
        self.resolved: dict[tuple[int, int], _Span] = {}
        self._view: object = None

    def moved(self) -> bool:
        """Whether a backend was protected, unprotected or closed since the last sync."""
        latest = last_access_change()
        if latest == self._seen:
            return False  # no memory at all changed: the common case, one comparison
        for backend, gen in zip(self._backends, self._gens, strict=True):
            if backend.access_generation != gen:
                return True
        self._seen = latest
        return False

    def sync(self) -> int:
        """Bring what was resolved up to date. A new memory map, or a backend that was closed
        (its memory is gone), forgets everything (``_MAP``); if only protection changed
        (``_REACH``), resolved buffers now out of reach are forgotten and the rest kept (the
        caller checks its rings); else ``_SAME``."""
        view = self._space.sections
        moved = self.moved()
        if view is self._view and not moved:
            return _SAME
        self._seen = last_access_change()
        self._gens = tuple(b.access_generation for b in self._backends)
        if view is self._view and not any(b.closed for b in self._backends):
            self.resolved = {k: span for k, span in self.resolved.items() if span.reachable()}
            return _REACH
        self.resolved.clear()
        self._buffers = {k: v for k, v in self._buffers.items() if not v[1].closed}
        self._backends = tuple(v[1] for v in self._buffers.values())
        self._gens = tuple(b.access_generation for b in self._backends)
        self._seen = last_access_change()
        self._view = view
        return _MAP

    def window(self, gpa: int, length: int) -> tuple[memoryview, int]:
        """``(buffer, offset)`` of a range inside one RAM section; else AddressSpaceError (for
        rings and indirect tables, which QEMU maps as one piece)."""
        buf, place = self.placed_window(gpa, length)
        return buf, place[1]

    def placed_window(self, gpa: int, length: int) -> tuple[memoryview, tuple[RamBlock, int, int]]:
        """:meth:`window`'s buffer and the range's ``(memory, offset, bytes)``."""
        ranges = self.memory.ranges(gpa, length)
        if len(ranges) != 1:
            raise AddressSpaceError(
                f"[0x{gpa:x}, +0x{length:x}) crosses the boundary of a memory region"
            )
        section, offset, n = ranges[0]
        return self._buffer(section.backend), (section.backend, offset, n)

    def span(self, gpa: int, length: int) -> _Span:
        """The host memory of ``[gpa, gpa+length)``; AddressSpaceError unless all of it is RAM."""
        cache = self.resolved
        span = cache.get((gpa, length))
        if span is None:
            span = self._resolve(gpa, length)
            if len(cache) >= self.CACHE_SIZE:
                cache.clear()
            cache[gpa, length] = span
        return span

    def _resolve(self, gpa: int, length: int) -> _Span:
        ranges = self.memory.ranges(gpa, length)
        places = [(section.backend, offset, n) for section, offset, n in ranges]
        if len(ranges) == 1:
            section, offset, _ = ranges[0]
            return _Span(gpa, length, self._buffer(section.backend), offset, (), places)
        pieces: list[tuple[memoryview, int, int]] = []
        for section, offset, n in ranges:
            buf = self._buffer(section.backend)
            # Neighbouring memslots of one backend are separate sections but contiguous host
            # memory: merge them so that the span stays one memoryview slice.
            if pieces and pieces[-1][0] is buf and pieces[-1][1] + pieces[-1][2] == offset:
                pieces[-1] = (buf, pieces[-1][1], pieces[-1][2] + n)
            else:
                pieces.append((buf, offset, n))
        if len(pieces) == 1:
            return _Span(gpa, length, pieces[0][0], pieces[0][1], (), places)
        return _Span(gpa, length, None, 0, pieces, places)

    def _buffer(self, backend: RamBlock) -> memoryview:
        entry = self._buffers.get(backend)
        if entry is None:
            entry = self._buffers[backend] = _host_buffer(backend)
            self._backends += (entry[1],)
            self._gens += (entry[1].access_generation,)
        return entry[0]


def _check_layout(num: int, desc: int, avail: int, used: int, max_size: int) -> None:
    max_size = min(max_size, MAX_QUEUE_SIZE)
    if not 1 <= num <= max_size or num & (num - 1):
        raise QueueSetupError(f"queue size {num} is not a power of two in [1, {max_size}]")
    for what, gpa, align, size in (
        ("descriptor table", desc, DESC_ALIGN, desc_table_size(num)),
        ("available ring", avail, AVAIL_ALIGN, avail_ring_size(num)),
        ("used ring", used, USED_ALIGN, used_ring_size(num)),
    ):
        if gpa < 0 or gpa % align or gpa + size > 1 << 64:
            raise QueueSetupError(
                f"{what} at 0x{gpa:x} (0x{size:x} bytes) is not {align}-byte aligned "
                "in 64-bit guest-physical space"
            )


_NO_MEMORY = memoryview(b"")


class _Rings:
    """The three ring areas of a queue as host memory, resolved once per memory map.

    After :meth:`refresh`, ``desc_buf[desc_off:]`` is the descriptor table, and likewise for
    the available and used rings.
    """

    __slots__ = (
        "avail_buf",
        "avail_off",
        "desc_buf",
        "desc_off",
        "dma",
        "places",
        "resolved",
        "ring_places",
        "used_buf",
        "used_off",
    )

    def __init__(self, memory: GuestMemory, num: int, desc: int, avail: int, used: int) -> None:
        self.dma = _Dma(memory)
        self.places = (
            ("descriptor table", desc, desc_table_size(num)),
            ("available ring", avail, avail_ring_size(num)),
            ("used ring", used, used_ring_size(num)),
        )
        self.resolved = False
        self.desc_buf = self.avail_buf = self.used_buf = _NO_MEMORY
        self.desc_off = self.avail_off = self.used_off = 0
        #: Each ring's ``(what, (memory, offset, bytes))``, from the last :meth:`refresh`.
        self.ring_places: list[tuple[str, tuple[RamBlock, int, int]]] = []

    def refresh(self) -> None:
        """Resolve the rings (and forget resolved buffers) if the memory map changed, check
        them if only protection changed; RingAccessError if a ring is not inside one RAM
        section within reach."""
        state = self.dma.sync()
        if self.resolved and state != _MAP:
            if state == _REACH:
                self._check_places()
            return
        self.resolved = False
        windows = []
        places = []
        for what, gpa, size in self.places:
            try:
                buf, place = self.dma.placed_window(gpa, size)
            except AddressSpaceError as exc:
                raise RingAccessError(f"cannot access the {what} at 0x{gpa:x}: {exc}") from exc
            windows.append((buf, place[1]))
            places.append((what, place))
        (self.desc_buf, self.desc_off), (self.avail_buf, self.avail_off) = windows[:2]
        self.used_buf, self.used_off = windows[2]
        self.ring_places = places
        self.resolved = True

    def check_reach(self) -> None:
        """RingAccessError if a ring went out of reach since :meth:`refresh`."""
        if self.dma.moved():
            self._check_places()

    def _check_places(self) -> None:
        for what, (memory, offset, n) in self.ring_places:
            try:
                memory.check_access(offset, n)
            except AddressSpaceError as exc:
                self.resolved = False
                raise RingAccessError(f"cannot access the {what}: {exc}") from exc


class Chain:
    """A validated descriptor chain: its head and its buffers.

    ``out`` are the device-readable buffers, ``in_`` the device-writable ones, as ``(gpa, len)``
    in chain order; ``out_len`` and ``in_len`` their total bytes. The buffers were resolved to
    host memory when the chain was popped (see the module doc).
    """

    __slots__ = ("_dma", "_in", "_out", "head", "in_len", "out_len")

    def __init__(self, head: int, dma: _Dma) -> None:
        self._dma = dma
        self.head = head
        self.out_len = 0
        self.in_len = 0
        self._out: list[_Span] = []
        self._in: list[_Span] = []

    @property
    def out(self) -> list[tuple[int, int]]:
        """The device-readable buffers as ``(gpa, len)``."""
        return [(s.gpa, s.size) for s in self._out]

    @property
    def in_(self) -> list[tuple[int, int]]:
        """The device-writable buffers as ``(gpa, len)``."""
        return [(s.gpa, s.size) for s in self._in]

    @property
    def in_places(self) -> list[tuple[RamBlock, int, int]]:
        """The device-writable buffers as ``(memory, offset, bytes)`` pieces of host memory."""
        return [place for span in self._in for place in span.places]

    def read_out(self, n: int) -> bytes:
        """The first ``n`` bytes of the device-readable buffers (fewer if they hold fewer)."""
        spans = self._out
        if len(spans) == 1:  # the common case, inline: one contiguous buffer
            span, buf = spans[0], spans[0].buf
            if buf is not None and span.size >= n:
                return bytes(buf[span.off : span.off + n])
        parts = []
        for span in spans:
            take = min(span.size, n)
            parts.append(span.read(take))
            n -= take
            if not n:
                break
        return b"".join(parts)

    def write_in(self, data: bytes) -> int:
        """Scatter ``data`` over the device-writable buffers; returns the bytes written.

        BufferAddressError (nothing written) if the request took one of them out of reach.
        """
        spans = self._in
        if self._dma.moved():
            for span in spans:
                try:
                    span.check_access()
                except AddressSpaceError as exc:
                    raise BufferAddressError(
                        f"buffer [0x{span.gpa:x}, +0x{span.size:x}) of the chain at head "
                        f"{self.head} went out of reach: {exc}"
                    ) from exc
        if len(spans) == 1:  # the common case, inline: one contiguous buffer
            span, buf = spans[0], spans[0].buf
            if buf is not None and span.size >= len(data):
                buf[span.off : span.off + len(data)] = data
                return len(data)
        done = 0
        for span in spans:
            take = min(span.size, len(data) - done)
            span.write(data[done : done + take])
            done += take
            if done == len(data):
                break
        return done


def _noop() -> None:
    pass


class VirtQueue:
    """The device's side of a split virtqueue in guest memory.

    :meth:`pop` returns the next available chain, validated, or None; :meth:`push` returns a
    chain to the driver through the used ring and calls ``interrupt`` unless the driver set
    NO_INTERRUPT. ``indirect`` says whether VIRTIO_F_INDIRECT_DESC was negotiated and
    ``max_size`` is the device's largest queue. Anything the guest wrote wrongly raises a
    :class:`VirtQueueError`; the queue is then unusable until the transport resets the device.
    """

    def __init__(
        self,
        memory: GuestMemory,
        num: int,
        desc: int,
        avail: int,
        used: int,
        *,
        interrupt: Callable[[], None] = _noop,
        indirect: bool = True,
        max_size: int = MAX_QUEUE_SIZE,
    ) -> None:
        _check_layout(num, desc, avail, used, max_size)
        self.num = num
        self.desc_gpa = desc
        self.avail_gpa = avail
        self.used_gpa = used
        self.interrupt = interrupt
        self.indirect = indirect
        self.last_avail_idx = 0
        self.used_idx = 0
        #: Chains popped and not pushed yet.
        self.inflight = 0
        self._rings = _Rings(memory, num, desc, avail, used)
        self._max_buffers = max(num, MAX_CHAIN_BUFFERS)

    @property
    def ring_places(self) -> list[tuple[str, tuple[RamBlock, int, int]]]:
        """Each ring's ``(what, (memory, offset, bytes))`` as of the last :meth:`pop`."""
        return self._rings.ring_places

    def save_state(self) -> dict[str, int]:
        """Where the queue is and how far the device got (QEMU's virtqueue state:
        ``last_avail_idx``, ``used_idx``); a chain in flight cannot be saved."""
        if self.inflight:
            raise VirtQueueError(f"{self.inflight} chain(s) in flight: the queue is not quiescent")
        return {
            "num": self.num,
            "desc": self.desc_gpa,
            "avail": self.avail_gpa,
            "used": self.used_gpa,
            "indirect": int(self.indirect),
            "last_avail_idx": self.last_avail_idx,
            "used_idx": self.used_idx,
        }

    def pop(self) -> Chain | None:
        """The next available chain, validated and resolved; None if the ring is empty."""
        rings = self._rings
        rings.refresh()
        (idx,) = _U16.unpack_from(rings.avail_buf, rings.avail_off + 2)
        last = self.last_avail_idx
        if idx == last:
            return None
        if (idx - last) & 0xFFFF > self.num:
            raise AvailIndexError(
                f"guest moved the available index from {last} to {idx} (queue size {self.num})"
            )
        (head,) = _U16.unpack_from(
            rings.avail_buf, rings.avail_off + 4 + 2 * (last & (self.num - 1))
        )
        if head >= self.num:
            raise DescriptorIndexError(
                f"guest says index {head} is available (queue size {self.num})"
            )
        chain = self._walk(head)
        self.last_avail_idx = (last + 1) & 0xFFFF
        self.inflight += 1
        return chain

    def _walk(self, head: int) -> Chain:
        rings = self._rings
        dma = rings.dma
        resolved = dma.resolved
        table, base = rings.desc_buf, rings.desc_off
        limit = self.num
        index = head
        visited = 0
        buffers = 0
        nested = False
        chain = Chain(head, dma)
        while True:
            visited += 1
            if visited > limit:
                raise DescriptorLoopError(f"looped descriptor chain at head {head}")
            addr, length, flags, nxt = _DESC.unpack_from(table, base + DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                table, base = self._indirect_table(dma, addr, length, flags, nested)
                limit = length // DESC_SIZE
                index = visited = 0
                nested = True
                continue
            buffers += 1
            if buffers > self._max_buffers:
                raise DescriptorLoopError(
                    f"chain at head {head} has over {self._max_buffers} buffers"
                )
            if length == 0:
                raise BufferAddressError(f"zero sized buffer in the chain at head {head}")
            span = resolved.get((addr, length))  # the buffers the driver used before
            if span is None:
                try:
                    span = dma.span(addr, length)
                except AddressSpaceError as exc:
                    raise BufferAddressError(
                        f"buffer [0x{addr:x}, +0x{length:x}) of the chain at head {head} is not "
                        f"guest RAM: {exc}"
                    ) from exc
            if flags & DESC_F_WRITE:
                chain._in.append(span)
                chain.in_len += length
            elif chain._in:
                raise DescriptorOrderError(
                    f"device-readable descriptor after a device-writable one at head {head}"
                )
            else:
                chain._out.append(span)
                chain.out_len += length
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= limit:
                raise DescriptorIndexError(f"descriptor next is {nxt} (table of {limit})")
            index = nxt

    def _indirect_table(
        self, dma: _Dma, addr: int, length: int, flags: int, nested: bool
    ) -> tuple[memoryview, int]:
        if not self.indirect:
            raise IndirectDescriptorError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
        if nested:
            raise IndirectDescriptorError("indirect descriptor inside an indirect table")
        if flags & DESC_F_NEXT:
            raise IndirectDescriptorError("indirect descriptor with NEXT set")
        if length == 0 or length % DESC_SIZE:
            raise IndirectDescriptorError(f"invalid size for indirect buffer table: {length}")
        try:
            return dma.window(addr, length)
        except AddressSpaceError as exc:
            raise IndirectDescriptorError(
                f"cannot map indirect table [0x{addr:x}, +0x{length:x}): {exc}"
            ) from exc

    def push(self, head: int, written: int) -> None:
        """Give chain ``head`` back with ``written`` bytes written; interrupt unless suppressed.

        Raises :class:`VirtQueueError` if no chain is in flight and ValueError for a head or
        length that cannot be one (both device bugs, not the guest's).
        """
        if not self.inflight:
            raise VirtQueueError("push without a popped chain")
        if not 0 <= head < self.num or not 0 <= written <= 0xFFFF_FFFF:
            raise ValueError(f"push of head {head} with {written} bytes written")
        rings = self._rings
        rings.check_reach()  # the request may have taken the rings out of reach
        i = self.used_idx
        _USED_ELEM.pack_into(
            rings.used_buf, rings.used_off + 4 + 8 * (i & (self.num - 1)), head, written
        )
        i = (i + 1) & 0xFFFF
        _U16.pack_into(rings.used_buf, rings.used_off + 2, i)
        self.used_idx = i
        self.inflight -= 1
        (flags,) = _U16.unpack_from(rings.avail_buf, rings.avail_off)
        if not flags & AVAIL_F_NO_INTERRUPT:
            self.interrupt()


class DriverQueue:
    """A guest driver's side of a split virtqueue, for guest models, tests and benchmarks.

    The rings are laid out at the start of ``[gpa, gpa+size)`` (descriptor table, available
    ring, used ring, each aligned as virtio 1.x requires) and zeroed; what is left is split
    into one indirect table per descriptor head. Buffers are ``(gpa, len)`` in guest memory
    that the caller filled (out) or will read (in). :meth:`add` publishes a chain at once;
    :meth:`kick` calls ``notify`` unless the device set NO_NOTIFY.
    """

    def __init__(
        self,
        memory: GuestMemory,
        gpa: int,
        size: int,
        *,
        num: int = 128,
        notify: Callable[[], None] = _noop,
        clear: bool = True,
    ) -> None:
        desc = align_up(gpa, DESC_ALIGN)
        avail = desc + desc_table_size(num)
        used = align_up(avail + avail_ring_size(num), USED_ALIGN)
        _check_layout(num, desc, avail, used, MAX_QUEUE_SIZE)
        end = used + used_ring_size(num)
        indirect = align_up(end, DESC_ALIGN)
        if indirect > gpa + size:
            raise DriverQueueError(
                f"0x{size:x} bytes at 0x{gpa:x} cannot hold a queue of {num} (0x{end - gpa:x})"
            )
        self.memory = memory
        self.num = num
        self.desc_gpa = desc
        self.avail_gpa = avail
        self.used_gpa = used
        self.notify = notify
        #: Descriptors in each head's indirect table (0: no indirect tables fit).
        self.indirect_capacity = (gpa + size - indirect) // num // DESC_SIZE
        self._indirect_gpa = indirect
        if clear:
            memory.write(desc, bytes(end - desc))
        self._rings = _Rings(memory, num, desc, avail, used)
        self._free = list(range(num - 1, -1, -1))
        self._chains: list[list[int] | None] = [None] * num
        self._avail_idx = 0
        self._last_used = 0

    @property
    def num_free(self) -> int:
        """Free descriptors."""
        return len(self._free)

    def save_state(self) -> dict[str, object]:
        """The driver's own bookkeeping (a guest keeps it in its RAM, which a migration
        carries): free descriptors, chains in flight, its indices. The rings themselves are in
        guest memory."""
        return {
            "num": self.num,
            "free": list(self._free),
            "chains": [[head, slots] for head, slots in enumerate(self._chains) if slots],
            "avail_idx": self._avail_idx,
            "last_used": self._last_used,
        }

    @classmethod
    def restore(
        cls,
        memory: GuestMemory,
        gpa: int,
        size: int,
        state: dict[str, object],
        *,
        notify: Callable[[], None] = _noop,
    ) -> DriverQueue:
        """The queue at ``[gpa, gpa+size)`` as :meth:`save_state` described it, its rings
        left as they are in memory (raises :class:`DriverQueueError` if ``state`` does not fit
        the layout)."""
        num = state.get("num")
        if not isinstance(num, int):
            raise DriverQueueError("driver queue state has no queue size")
        q = cls(memory, gpa, size, num=num, notify=notify, clear=False)
        free, chains = state.get("free"), state.get("chains")
        avail, used = state.get("avail_idx"), state.get("last_used")
        if not (
            isinstance(free, list)
            and isinstance(chains, list)
            and isinstance(avail, int)
            and isinstance(used, int)
            and 0 <= avail <= 0xFFFF
            and 0 <= used <= 0xFFFF
        ):
            raise DriverQueueError("driver queue state is malformed")
        q._free = [int(d) for d in free]
        q._chains = [None] * num
        for entry in chains:
            head, slots = entry
            q._chains[int(head)] = [int(d) for d in slots]
        owned = q._free + [d for c in q._chains if c for d in c]
        if sorted(owned) != list(range(num)):
            raise DriverQueueError("driver queue state does not account for every descriptor")
        q._avail_idx, q._last_used = avail, used
        return q

    def add(
        self,
        out_bufs: Sequence[tuple[int, int]],
        in_bufs: Sequence[tuple[int, int]],
        *,
        indirect: bool = False,
    ) -> int:
        """Publish a chain of device-readable then device-writable buffers; returns its head.

        Buffers are ``(gpa, len)`` with ``len`` below 2**32; they are written as given, even
        where the device will refuse them (tests use that). With ``indirect`` the buffers go
        into the head's indirect table and the chain uses one descriptor. Raises
        :class:`DriverQueueError` if the chain does not fit.
        """
        count = len(out_bufs) + len(in_bufs)
        if not count:
            raise DriverQueueError("a chain needs at least one buffer")
        rings = self._rings
        rings.refresh()
        free = self._free
        if indirect:
            if count > self.indirect_capacity:
                raise DriverQueueError(
                    f"{count} buffers do not fit an indirect table of {self.indirect_capacity}"
                )
            if not free:
                raise DriverQueueError("the queue is full")
            head = free.pop()
            table_gpa = self._indirect_gpa + head * self.indirect_capacity * DESC_SIZE
            table, base = rings.dma.window(table_gpa, count * DESC_SIZE)
            self._write_chain(table, base, list(range(count)), out_bufs, in_bufs)
            _DESC.pack_into(
                rings.desc_buf,
                rings.desc_off + DESC_SIZE * head,
                table_gpa,
                count * DESC_SIZE,
                DESC_F_INDIRECT,
                0,
            )
            slots = [head]
        else:
            if count > len(free):
                raise DriverQueueError(f"{count} buffers but {len(free)} free descriptors")
            slots = free[-count:]
            del free[-count:]
            self._write_chain(rings.desc_buf, rings.desc_off, slots, out_bufs, in_bufs)
            head = slots[0]
        self._chains[head] = slots
        idx = self._avail_idx
        _U16.pack_into(rings.avail_buf, rings.avail_off + 4 + 2 * (idx & (self.num - 1)), head)
        self._avail_idx = idx = (idx + 1) & 0xFFFF
        _U16.pack_into(rings.avail_buf, rings.avail_off + 2, idx)
        return head

    @staticmethod
    def _write_chain(
        table: memoryview,
        base: int,
        slots: list[int],
        out_bufs: Sequence[tuple[int, int]],
        in_bufs: Sequence[tuple[int, int]],
    ) -> None:
        n_out = len(out_bufs)
        last = len(slots) - 1
        for k, slot in enumerate(slots):
            if k < n_out:
                addr, length = out_bufs[k]
                flags = 0
            else:
                addr, length = in_bufs[k - n_out]
                flags = DESC_F_WRITE
            if k < last:
                _DESC.pack_into(
                    table, base + DESC_SIZE * slot, addr, length, flags | DESC_F_NEXT, slots[k + 1]
                )
            else:
                _DESC.pack_into(table, base + DESC_SIZE * slot, addr, length, flags, 0)

    def kick(self) -> None:
        """Notify the device unless it suppressed notifications (NO_NOTIFY)."""
        rings = self._rings
        rings.refresh()
        (flags,) = _U16.unpack_from(rings.used_buf, rings.used_off)
        if not flags & USED_F_NO_NOTIFY:
            self.notify()

    def get_used(self) -> tuple[int, int] | None:
        """The next used chain as ``(head, written length)``, freeing its descriptors; or None.

        Raises :class:`DriverQueueError` if the device returned a head that is not in flight
        or moved the used index too far.
        """
        rings = self._rings
        rings.refresh()
        (idx,) = _U16.unpack_from(rings.used_buf, rings.used_off + 2)
        last = self._last_used
        if idx == last:
            return None
        if (idx - last) & 0xFFFF > self.num:
            raise DriverQueueError(f"device moved the used index from {last} to {idx}")
        head, length = _USED_ELEM.unpack_from(
            rings.used_buf, rings.used_off + 4 + 8 * (last & (self.num - 1))
        )
        chain = self._chains[head] if head < self.num else None
        if chain is None:
            raise DriverQueueError(f"device returned head {head}, which is not in flight")
        self._chains[head] = None
        self._free.extend(chain)
        self._last_used = (last + 1) & 0xFFFF
        return head, length

    def suppress_interrupts(self, suppress: bool) -> None:
        """Set or clear NO_INTERRUPT in the available ring's flags."""
        rings = self._rings
        rings.refresh()
        _U16.pack_into(rings.avail_buf, rings.avail_off, AVAIL_F_NO_INTERRUPT if suppress else 0)
