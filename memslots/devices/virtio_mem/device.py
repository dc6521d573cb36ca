"""The virtio-mem device: plugged blocks, guest requests, and memslots that come and go.

Its wire format (requests, responses, config space) is in
:mod:`memslots.devices.virtio_mem.wire`.

State and rules follow the virtio spec (device ID 24) and QEMU 8.2+'s choices where the spec
leaves room (``../shared/reference/virtio-mem-spec.md``, ``qemu-behaviour.md`` §3b-§4, §6).

How device memory is exposed:

* ``dynamic-memslots=off`` (QEMU's default, our baseline): the backend's RAM region is the
  device region and is mapped whole, as one memslot, when the device is plugged.
* ``dynamic-memslots=on``: the device region is an empty container with ``N`` unmergeable
  aliases (``memslot-<i>``) into the backend; ``N`` is decided once before realize. A memslot is
  mapped when a block in it gets plugged and unmapped when its last block is unplugged.
* ``memslot-size=S`` (our extension, Firecracker-style): like ``on`` but with memslots of a fixed
  size ``S`` instead of the automatic decision; the memslot budget rules still apply.

Order of operations (see docs/DESIGN.md): on plug, the memslots are mapped before the blocks
are marked plugged, so the guest never sees a plugged block without RAM behind it; on unplug,
the blocks are marked unplugged, empty memslots are unmapped, and only then is the memory
discarded, so no consumer (KVM, a vhost back-end) still maps memory that is being freed.

Unplugged memory out of reach (``unplugged-inaccessible=on``, the default): our mapping of every
unplugged block is ``PROT_NONE`` from realize on; a plug makes its blocks read/write before
anything else (prealloc, mapping, the ACK), an unplug takes them out of reach again after the
discard. With dynamic memslots a memslot stays mapped while any of its blocks is plugged, so
this is what keeps a guest from the unplugged blocks of a partly plugged memslot: KVM fails
such an access (the VMM stops the VM, :mod:`memslots.machine.vm`) instead of allocating host
memory, and our own copies into them are refused. A vhost-user back-end maps the memfd itself,
so our protection does not reach its mapping. With ``off`` every block stays read/write, as in
QEMU.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from memslots.devices.memory_device import MemoryDevice, MemslotInfo, MemslotPlan, SizeListener
from memslots.devices.qom import QomObject, QomProperty, refuse, refuse_after_realize
from memslots.devices.virtio_mem.wire import (
    REQUEST_SIZE,
    BlockState,
    Config,
    ReqType,
    Request,
    Resp,
    Response,
)
from memslots.errors import (
    ConfigError,
    DeviceError,
    MemslotsError,
    MigrationError,
    PropertyError,
)
from memslots.host.pages import HostPages
from memslots.memory.address_space import AddressSpace, MemoryRegion
from memslots.memory.backends import MemoryBackend
from memslots.options import VirtioMemOptions
from memslots.sizes import GiB, MiB, align_up, hex_size, is_power_of_two

log = logging.getLogger("memslots.devices.virtio_mem")

#: Smallest block size (VIRTIO_MEM_MIN_BLOCK_SIZE).
MIN_BLOCK_SIZE = 1 * MiB
#: Every memslot but the last is at least this big (VIRTIO_MEM_MIN_MEMSLOT_SIZE).
MIN_MEMSLOT_SIZE = 1 * GiB
#: x86: the usable region may extend this far past requested-size (2 x 128 MiB).
USABLE_EXTENT = 256 * MiB
#: Entries of the one request queue.
QUEUE_SIZE = 128
#: The type of the object behind ``/machine/peripheral/<id>`` for ``-device virtio-mem`` on x86:
#: the PCI proxy, whose virtio device is the child ``virtio-backend``.
PROXY_TYPE = "virtio-mem-pci"
VIRTIO_CHILD = "virtio-backend"
#: Request and response names by wire value (``requests`` counts by them). The request path
#: looks names and answers up here because an enum member lookup costs ~0.2 µs on Python 3.11.
_REQUEST_NAMES = {int(t): t.name.lower() for t in ReqType}
_RESPONSE_NAMES = {int(r): r.name.lower() for r in Resp}
#: Responses are immutable, so one instance of each answer serves every request.
_ACK, _NACK, _BUSY, _ERROR = (Response(r) for r in (Resp.ACK, Resp.NACK, Resp.BUSY, Resp.ERROR))
_PLUGGED, _UNPLUGGED, _MIXED = (
    Response(Resp.ACK, st) for st in (BlockState.PLUGGED, BlockState.UNPLUGGED, BlockState.MIXED)
)


class PageSized(Protocol):
    """Anything with a backing page size (host memory, or memory described for planning)."""

    @property
    def page_size(self) -> int:
        """The backing page size in bytes."""
        ...


def default_block_size(backend: PageSized, pages: HostPages) -> int:
    """The default block size for ``backend`` on a host with these ``pages`` (QEMU's
    virtio_mem_default_block_size).

    Base-page backends (anonymous, memfd, shmem, ordinary files) get ``max(page, THP size)``;
    huge page backends get ``max(page, 1 MiB)``.
    """
    if backend.page_size == pages.page_size:
        return max(backend.page_size, pages.thp_size)
    return max(backend.page_size, MIN_BLOCK_SIZE)


@dataclass(frozen=True)
class VirtioMemEarlyState:
    """What QEMU sends before any RAM (``virtio-mem-device-early``): the sanity block
    (``addr``, ``region_size``, ``block_size``, ``node``), ``size`` and the plugged bitmap
    (one byte per block, 1 = plugged). Memslots are not in it: the destination decides its own.
    """

    addr: int
    region_size: int
    block_size: int
    node: int
    size: int
    bitmap: bytes


@dataclass(frozen=True)
class VirtioMemLateState:
    """What QEMU sends with the other devices (``virtio-mem-device``): ``usable_region_size``,
    ``requested_size`` and the virtio device state, opaque here (the transport's)."""

    usable_region_size: int
    requested_size: int
    virtio: bytes = b""


_PLUGGED_RUN = re.compile(rb"\x01+")
_UNPLUGGED_RUN = re.compile(rb"\x00+")


class VirtioMem(MemoryDevice):
    """A virtio-mem device (QEMU's ``virtio-mem`` / ``virtio-mem-pci``)."""

    info_type = "virtio-mem"
    decides_memslots = True
    qom_children = (VIRTIO_CHILD,)

    def __init__(
        self,
        opts: VirtioMemOptions,
        memdev: MemoryBackend | None,
        address_space: AddressSpace,
        *,
        pages: HostPages,
        numa_nodes: int = 0,
    ) -> None:
        self.opts = opts
        #: The host's page sizes: the default block size follows its THP size.
        self.pages = pages
        self.id = opts.id
        self.memdev = memdev
        self.address_space = address_space
        self.numa_nodes = numa_nodes
        self.node = opts.node
        self._block_size = 0
        if opts.block_size is not None:
            self._check_block_size_value(opts.block_size)
            self._block_size = opts.block_size
        self.requested_size = opts.requested_size
        self.addr = opts.memaddr
        self.size = 0
        self.usable_region_size = 0
        self.dynamic = opts.dynamic_memslots or opts.memslot_size is not None
        self.unplugged_inaccessible = opts.unplugged_inaccessible
        self.nb_memslots = 0
        self.memslot_size = 0
        self.mr: MemoryRegion | None = None
        self.memslots: list[MemoryRegion] = []
        self._slot_plugged: list[int] = []
        #: Blocks per memslot (dynamic memslots, once realized).
        self._blocks_per_slot = 0
        self.bitmap = bytearray()
        self.realized = False
        #: Set by a protocol violation (QEMU's virtio_error); cleared by a device reset.
        self.needs_reset = False
        #: While True (e.g. migration running), plug/unplug/unplug-all get BUSY.
        self.busy = False
        #: Requests answered BUSY because of :attr:`busy` (not because a mapping failed).
        self.busy_answers = 0
        #: Set on an incoming migration's destination before realize: realize then skips the
        #: initial discard (the memory is the source's, or about to be).
        self.incoming = False
        self.requests: Counter[tuple[str, str]] = Counter()
        self.discard_failures = 0
        #: Unplugged ranges that could not be taken out of reach (or plugged ones back into it).
        self.protect_failures = 0
        #: Guest accesses to its unplugged memory that KVM failed (counted by the guest VM).
        self.guest_faults = 0
        #: Whether unplugged blocks are PROT_NONE (``unplugged-inaccessible=on``, from realize).
        self.protects = False
        self.size_change_listeners: list[SizeListener] = []
        self.config_change_listeners: list[Callable[[VirtioMem], None]] = []

    # -- properties ----------------------------------------------------------------------------

    @staticmethod
    def _check_block_size_value(value: int) -> None:
        if value < MIN_BLOCK_SIZE:
            raise PropertyError(
                f"'block-size' property has to be at least {hex_size(MIN_BLOCK_SIZE)}"
            )
        if not is_power_of_two(value):
            raise PropertyError("'block-size' property has to be a power of two")

    @property
    def block_size(self) -> int:
        """The block size: as set, or the computed default while unset (QEMU's getter)."""
        if self._block_size:
            return self._block_size
        if self.memdev is None:
            return self.pages.thp_size
        return default_block_size(self.memdev.memory, self.pages)

    def set_block_size(self, value: int) -> None:
        """Set ``block-size``; only allowed before realize."""
        if self.realized:
            raise PropertyError("'block-size' cannot be changed")
        self._check_block_size_value(value)
        self._block_size = value

    def set_requested_size(self, value: int) -> None:
        """qom-set ``requested-size``: validate, grow the usable region, notify the driver."""
        if self.realized:
            if value % self.block_size:
                raise PropertyError(
                    "'requested-size' has to be multiples of 'block-size' "
                    f"{hex_size(self.block_size, parens=True)}"
                )
            assert self.memdev is not None
            if value > self.memdev.size:
                raise PropertyError(
                    f"'requested-size' cannot exceed the memory backend size"
                    f"{hex_size(self.memdev.size, parens=True)}"
                )
            self.requested_size = value
            self._resize_usable_region(value, can_shrink=False)
            # QEMU notifies the driver even when the value did not change.
            for cb in list(self.config_change_listeners):
                cb(self)
        else:
            self.requested_size = value

    @property
    def region_size(self) -> int:
        """Size of the device's memory region (the backend's size)."""
        return self.memdev.size if self.memdev is not None else 0

    @property
    def nb_blocks(self) -> int:
        """Number of blocks in the region."""
        return len(self.bitmap)

    @property
    def last_memslot_size(self) -> int:
        """Size of the last memslot (the others have ``memslot_size``)."""
        if not self.dynamic or self.nb_memslots <= 1:
            return self.region_size
        return self.region_size - (self.nb_memslots - 1) * self.memslot_size

    @property
    def decided_memslots(self) -> int:
        """How many memslots the device uses when all of it is plugged."""
        return max(1, self.nb_memslots) if self.dynamic else 1

    def config(self) -> Config:
        """The current config space."""
        return Config(
            block_size=self.block_size,
            node_id=self.node,
            addr=self.addr,
            region_size=self.region_size,
            usable_region_size=self.usable_region_size,
            plugged_size=self.size,
            requested_size=self.requested_size,
        )

    # -- memory-device interface -----------------------------------------------------------------

    def get_memory_region(self) -> MemoryRegion:
        if self.memdev is None:
            raise ConfigError(f"virtio-mem '{self.label}': 'memdev' property must be set")
        if self.dynamic:
            if self.mr is None:
                self.mr = MemoryRegion.container(
                    "virtio-mem", self.memdev.size, align=self.memdev.region.align
                )
            return self.mr
        return self.memdev.region

    def get_memslots(self) -> int:
        return self.nb_memslots if self.dynamic else 1

    def get_min_alignment(self) -> int:
        return self.block_size

    def get_addr(self) -> int:
        return self.addr

    def set_addr(self, addr: int) -> None:
        self.addr = addr

    def get_plugged_size(self) -> int:
        return self.size

    def decide_memslots(self, limit: int) -> None:
        """Decide once, before realize, how many memslots to use (QEMU's rules)."""
        if not self.dynamic:
            return
        assert self.nb_memslots == 0, "decide_memslots is called exactly once"
        if self.memdev is None:
            self.nb_memslots = 1
            return
        region = self.memdev.size
        if not self._block_size:
            # Fix the default now: the minimum memslot size depends on it.
            self._block_size = default_block_size(self.memdev.memory, self.pages)
        bs = self._block_size
        if bs < self.memdev.memory.page_size or region % bs:
            self.nb_memslots = 1  # realize will fail anyway
            return
        if self.opts.memslot_size is not None:
            size = self.opts.memslot_size
            if size < bs or size % bs:
                raise ConfigError(
                    f"virtio-mem '{self.label}': 'memslot-size' {hex_size(size)} has to be a "
                    f"multiple of 'block-size' {hex_size(bs)}"
                )
        else:
            if limit <= 1:
                self.nb_memslots = 1
                return
            size = align_up(region // limit, bs)
            size = max(size, max(bs, MIN_MEMSLOT_SIZE))
        n = -(-region // size)
        if n != 1:
            self.memslot_size = size
        self.nb_memslots = n

    # -- realize -------------------------------------------------------------------------------

    def realize(self) -> None:
        """Validate properties against the backend and build the memslots (QEMU's order)."""
        label = self.label
        memdev = self.memdev
        if memdev is None:
            raise ConfigError(f"virtio-mem '{label}': 'memdev' property is not set")
        if memdev.used_by is not None:
            raise ConfigError(
                f"virtio-mem '{label}': 'memdev' property specifies a busy memdev: {memdev.id}"
            )
        if memdev.prealloc:
            raise ConfigError(
                f"virtio-mem '{label}': 'memdev' property specifies a memdev with preallocation "
                f"enabled: {memdev.id}. Instead, specify 'prealloc=on' for the virtio-mem device. "
            )
        if (self.numa_nodes and self.node >= self.numa_nodes) or (
            not self.numa_nodes and self.node
        ):
            raise ConfigError(
                f"virtio-mem '{label}': 'node' property has value '{self.node}', which exceeds"
                f"the number of numa nodes: {self.numa_nodes or 1}"
            )
        page_size = memdev.memory.page_size
        default_bs = default_block_size(memdev.memory, self.pages)
        if self.unplugged_inaccessible == "auto":
            # Only private anonymous memory with base pages has the shared zeropage.
            self.unplugged_inaccessible = "off" if self._shared_zeropage() else "on"
        elif self.unplugged_inaccessible == "off" and not self._shared_zeropage():
            log.warning(
                "'unplugged-inaccessible' property set to 'off' with a memdev that does not "
                "support the shared zeropage."
            )
        if self.dynamic and self.unplugged_inaccessible != "on":
            what = "memslot-size" if self.opts.memslot_size is not None else "dynamic-memslots"
            raise ConfigError(
                f"virtio-mem '{label}': '{what}' property set to 'on' requires "
                "'unplugged-inaccessible' to be 'on'"
            )
        if not self._block_size:
            self._block_size = default_bs
        bs = self._block_size
        if bs < page_size:
            raise ConfigError(
                f"virtio-mem '{label}': 'block-size' property has to be at least the page size "
                f"{hex_size(page_size, parens=True)}"
            )
        if bs < default_bs:
            log.warning(
                "'block-size' property is smaller than the default block size (%x MiB)",
                default_bs // MiB,
            )
        if self.requested_size % bs:
            raise ConfigError(
                f"virtio-mem '{label}': 'requested-size' property has to be multiples of "
                f"'block-size' {hex_size(bs, parens=True)}"
            )
        if self.addr % bs:
            raise ConfigError(
                f"virtio-mem '{label}': 'memaddr' property has to be multiples of "
                f"'block-size' {hex_size(bs, parens=True)}"
            )
        if memdev.size % bs:
            raise ConfigError(
                f"virtio-mem '{label}': 'memdev' property memdev size has to be multiples of"
                f"'block-size' {hex_size(bs, parens=True)}"
            )
        # A fresh start: nothing is plugged, so no host memory may stay populated. An incoming
        # migration skips this, as QEMU does (shared memory may hold the source's data).
        if not self.incoming:
            try:
                memdev.memory.discard(0, memdev.size)
            except MemslotsError as exc:
                raise ConfigError(
                    f"virtio-mem '{label}': Unexpected error discarding RAM: {exc}"
                ) from exc
        # Nothing is plugged yet, so all of it goes out of reach (an incoming migration's
        # early state brings its plugged blocks back before any RAM arrives).
        self.protects = self.unplugged_inaccessible == "on"
        if self.protects:
            try:
                memdev.memory.protect(0, memdev.size)
            except MemslotsError as exc:
                self._unprotect_all()
                self.protects = False
                raise ConfigError(
                    f"virtio-mem '{label}': cannot make unplugged memory inaccessible: {exc}"
                ) from exc
        self._resize_usable_region(self.requested_size, can_shrink=True)
        self.bitmap = bytearray(memdev.size // bs)
        if self.dynamic:
            container = self.get_memory_region()
            if self.nb_memslots <= 1:
                self.nb_memslots = 1
                self.memslot_size = memdev.size
            self.memslots = [
                MemoryRegion.alias(
                    f"{label}/memslot-{i}",
                    memdev.region,
                    i * self.memslot_size,
                    min(self.memslot_size, memdev.size - i * self.memslot_size),
                    mergeable=False,
                )
                for i in range(self.nb_memslots)
            ]
            self._slot_plugged = [0] * self.nb_memslots
            self._blocks_per_slot = self.memslot_size // bs
            assert container.size == memdev.size
        memdev.used_by = label
        self.realized = True

    def _shared_zeropage(self) -> bool:
        """Only private anonymous memory with base pages reads back as the shared zeropage."""
        assert self.memdev is not None
        mem = self.memdev.memory
        return (
            not self.memdev.opts.share
            and not mem.fd_backed
            and mem.page_size == self.pages.page_size
        )

    def unrealize(self) -> None:
        """Give the backend back, all of it within reach again (the device must have been
        unplugged from the machine)."""
        if self.memdev is not None and self.memdev.used_by == self.label:
            if self.protects:
                self._unprotect_all()
            self.memdev.used_by = None
        self.realized = False
        self.protects = False

    def _unprotect_all(self) -> None:
        assert self.memdev is not None
        try:
            self.memdev.memory.unprotect(0, self.memdev.size)
        except MemslotsError as exc:
            self.protect_failures += 1
            log.warning("virtio-mem '%s': %s", self.label, exc)

    def check_unplug(self) -> None:
        """QEMU's refusals of ``device_del`` for a virtio-mem device."""
        if self.unplugged_inaccessible != "on":
            raise DeviceError(
                "virtio-mem device cannot get unplugged while 'unplugged-inaccessible' != 'on'"
            )
        if self.size:
            # QEMU 9.1's text (8.2: "... while 'size' != '0'").
            raise DeviceError(
                "virtio-mem device cannot get unplugged while some of its memory is still plugged"
            )
        if self.requested_size:
            raise DeviceError(
                "virtio-mem device cannot get unplugged while 'requested-size' != '0'"
            )

    def _resize_usable_region(self, requested: int, *, can_shrink: bool) -> None:
        bs = self.block_size
        newsize = align_up(min(self.region_size, requested + USABLE_EXTENT), bs)
        if not requested:
            newsize = 0
        if newsize < self.usable_region_size and not can_shrink:
            return
        self.usable_region_size = newsize

    # -- guest requests ------------------------------------------------------------------------

    def handle_request(self, data: bytes) -> bytes:
        """Process one request as the guest wrote it; return the 10-byte response.

        A protocol violation (short request, unknown type) makes the device need a reset, as
        QEMU's ``virtio_error`` does, and raises :class:`DeviceError`; no state changes.
        """
        if self.needs_reset:
            raise DeviceError(f"virtio-mem '{self.label}' needs a reset")
        if len(data) < REQUEST_SIZE:
            self.protocol_violation(f"invalid request size: {len(data)}")
        req = Request.unpack(data)
        if req.type not in ReqType._value2member_map_:
            self.protocol_violation(f"unknown request type: {req.type}")
        return self.execute(req).pack()

    def protocol_violation(self, what: str) -> NoReturn:
        """The driver broke the protocol: the device needs a reset (QEMU's virtio_error)."""
        self.needs_reset = True
        raise DeviceError(f"virtio-mem '{self.label}': virtio-mem protocol violation: {what}")

    def execute(self, req: Request) -> Response:
        """Process a parsed request of a known type (KeyError for an unknown one)."""
        name = _REQUEST_NAMES[req.type]
        if name == "state":
            resp = self._state(req.addr, req.nb_blocks)
        elif name == "unplug_all":
            resp = Response(self._unplug_all())
        else:
            resp = self._state_change(req.addr, req.nb_blocks, plug=name == "plug")
        self.requests[name, _RESPONSE_NAMES[resp.type]] += 1
        return resp

    def out_of_reach_after(self, req: Request) -> list[tuple[int, int]]:
        """Backend byte ranges ``(start, end)`` that executing ``req`` would take out of reach:
        an UNPLUG's blocks, or every plugged block for UNPLUG_ALL; none without protection or
        for a request that will change nothing (invalid, or the device busy).

        The transport refuses a request whose own response or queue lies there: writing the
        answer into memory the request made PROT_NONE would kill the process.
        """
        if not self.protects or self.busy:
            return []
        bs = self.block_size
        if req.type == ReqType.UNPLUG:
            rng = self._block_range(req.addr, req.nb_blocks)
            if rng is None or self.bitmap.count(1, rng[0], rng[0] + rng[1]) != rng[1]:
                return []
            return [(rng[0] * bs, (rng[0] + rng[1]) * bs)]
        if req.type == ReqType.UNPLUG_ALL:
            return [(f * bs, (f + n) * bs) for f, n in self.plugged_ranges()]
        return []

    def _block_range(self, gpa: int, nb_blocks: int) -> tuple[int, int] | None:
        """``(first block, count)`` if the range is valid for the usable region, else None."""
        bs = self.block_size
        offset = gpa - self.addr  # the address is a multiple of the block size
        if offset % bs or not 0 < nb_blocks <= (self.usable_region_size - offset) // bs:
            return None
        return (offset // bs, nb_blocks) if offset >= 0 else None

    def _state_change(self, gpa: int, nb_blocks: int, *, plug: bool) -> Response:
        rng = self._block_range(gpa, nb_blocks)
        if rng is None:
            return _ERROR
        first, count = rng
        if plug and self.size + count * self.block_size > self.requested_size:
            return _NACK
        # Every block must be in the other state: one already in the wanted state is an error.
        if self.bitmap.find(1 if plug else 0, first, first + count) >= 0:
            return _ERROR
        if self.busy:
            self.busy_answers += 1
            return _BUSY
        ok = self._plug(first, count) if plug else self._unplug(first, count)
        return _ACK if ok else _BUSY

    def _state(self, gpa: int, nb_blocks: int) -> Response:
        rng = self._block_range(gpa, nb_blocks)
        if rng is None:
            return _ERROR
        first, count = rng
        plugged = self.bitmap.count(1, first, first + count)
        if plugged == count:
            return _PLUGGED
        return _UNPLUGGED if plugged == 0 else _MIXED

    # -- block state changes -------------------------------------------------------------------

    def _slot_blocks(self, first: int, count: int) -> list[tuple[int, int]]:
        """The memslots that blocks ``[first, first+count)`` lie in, each with how many of them
        (none without dynamic memslots)."""
        if not self.dynamic:
            return []
        per_slot = self._blocks_per_slot
        end = first + count
        return [
            (i, min(end, (i + 1) * per_slot) - max(first, i * per_slot))
            for i in range(first // per_slot, (end - 1) // per_slot + 1)
        ]

    def _plug(self, first: int, count: int) -> bool:
        # Within reach first: prealloc populates the blocks, the guest uses them after the ACK.
        if not self._set_accessible(first, count, True):
            return False
        if self.opts.prealloc and not self._preallocate(first, count):
            self._set_accessible(first, count, False)
            return False
        slots = self._slot_blocks(first, count)
        # Map first: the guest may touch the blocks as soon as it sees the ACK.
        if not self._set_mapped([i for i, _ in slots if not self.memslots[i].mapped], True):
            if self.opts.prealloc:
                self._discard(first * self.block_size, count * self.block_size)
            self._set_accessible(first, count, False)
            return False
        for i, n in slots:
            self._slot_plugged[i] += n
        self.bitmap[first : first + count] = b"\x01" * count
        self._size_changed(self.size + count * self.block_size)
        return True

    def _unplug(self, first: int, count: int) -> bool:
        bs = self.block_size
        slots = self._slot_blocks(first, count)
        empty = [i for i, n in slots if self._slot_plugged[i] == n]
        # Unmap first, so no consumer still maps the memory when it is given back.
        if not self._set_mapped(empty, False):
            return False
        if not self._discard(first * bs, count * bs):
            # As QEMU: a failed discard is BUSY with nothing changed, so map back what we took.
            self._set_mapped(empty, True)
            return False
        for i, n in slots:
            self._slot_plugged[i] -= n
        self.bitmap[first : first + count] = bytes(count)
        # Out of reach only after the discard: a failed discard undoes the unplug (BUSY), and
        # the blocks, still plugged, must stay in reach.
        self._set_accessible(first, count, False)
        self._size_changed(self.size - count * bs)
        return True

    def _unplug_all(self) -> Resp:
        if self.size:
            if self.busy:
                self.busy_answers += 1
                return Resp.BUSY
            mapped = [i for i, r in enumerate(self.memslots) if r.mapped]
            if not self._set_mapped(mapped, False):
                return Resp.BUSY
            if not self._discard(0, self.region_size):
                self._set_mapped(mapped, True)
                return Resp.BUSY
            self._slot_plugged = [0] * self.nb_memslots
            self.bitmap[:] = bytes(len(self.bitmap))
            self._set_accessible(0, self.nb_blocks, False)
            self._size_changed(0)
        self._resize_usable_region(self.requested_size, can_shrink=True)
        return Resp.ACK

    def _preallocate(self, first: int, count: int) -> bool:
        """``prealloc=on``: populate the blocks before plugging; a shortage is BUSY (QEMU)."""
        assert self.memdev is not None
        bs = self.block_size
        try:
            self.memdev.memory.populate(first * bs, count * bs)
        except MemslotsError as exc:
            log.warning("virtio-mem '%s': preallocation failed: %s", self.label, exc)
            self._discard(first * bs, count * bs)
            return False
        return True

    def _set_mapped(self, indices: list[int], mapped: bool) -> bool:
        """Map or unmap memslots in one transaction; False (logged) if a consumer refused."""
        if not indices:
            return True
        assert self.mr is not None
        try:
            with self.address_space.transaction():
                for i in indices:
                    if mapped:
                        self.address_space.add_subregion(
                            self.mr, i * self.memslot_size, self.memslots[i]
                        )
                    else:
                        self.address_space.del_subregion(self.mr, self.memslots[i])
        except MemslotsError as exc:
            what = "map" if mapped else "unmap"
            log.warning("virtio-mem '%s': cannot %s memslots: %s", self.label, what, exc)
            return False
        return True

    def _set_accessible(self, first: int, count: int, accessible: bool) -> bool:
        """Bring blocks into reach or take them out of it (with ``unplugged-inaccessible=on``);
        False (logged, counted) if the kernel refused (e.g. ``vm.max_map_count``).

        A block that could not be taken out of reach stays counted as protected, so our own
        copies still refuse it; only the guest might then reach it, as with ``off``.
        """
        if not self.protects:
            return True
        assert self.memdev is not None
        bs = self.block_size
        memory = self.memdev.memory
        try:
            if accessible:
                memory.unprotect(first * bs, count * bs)
            else:
                memory.protect(first * bs, count * bs)
        except MemslotsError as exc:
            self.protect_failures += 1
            log.warning("virtio-mem '%s': %s", self.label, exc)
            if accessible:
                # Part of the range may be open now: close it again (best effort).
                with contextlib.suppress(MemslotsError):
                    memory.protect(first * bs, count * bs)
            return False
        return True

    def _discard(self, offset: int, length: int) -> bool:
        assert self.memdev is not None
        try:
            self.memdev.memory.discard(offset, length)
        except MemslotsError as exc:
            self.discard_failures += 1
            log.warning("virtio-mem '%s': %s", self.label, exc)
            return False
        return True

    def _size_changed(self, new_size: int) -> None:
        self.size = new_size
        for cb in list(self.size_change_listeners):
            cb(self, new_size)

    # -- resets --------------------------------------------------------------------------------

    def device_reset(self) -> None:
        """A virtio device reset: block states, memslots and memory stay as they are."""
        self.needs_reset = False

    def system_reset(self) -> None:
        """A system reset: everything gets unplugged (memslots unmapped, memory discarded) and
        the usable region shrinks to what ``requested-size`` needs.

        While busy (migration) QEMU's unplug-all fails and nothing changes.
        """
        self.needs_reset = False
        self._unplug_all()

    # -- migration -----------------------------------------------------------------------------

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """Plugged runs of blocks as ``(first block, blocks)``, in order."""
        return [(m.start(), m.end() - m.start()) for m in _PLUGGED_RUN.finditer(self.bitmap)]

    def unplugged_ranges(self) -> list[tuple[int, int]]:
        """Unplugged runs of blocks as ``(first block, blocks)``, in order."""
        return [(m.start(), m.end() - m.start()) for m in _UNPLUGGED_RUN.finditer(self.bitmap)]

    def save_early(self) -> VirtioMemEarlyState:
        """The early state (the source must keep the device busy from here on, so the bitmap
        it describes stays true)."""
        return VirtioMemEarlyState(
            addr=self.addr,
            region_size=self.region_size,
            block_size=self.block_size,
            node=self.node,
            size=self.size,
            bitmap=bytes(self.bitmap),
        )

    def save_late(self, virtio: bytes = b"") -> VirtioMemLateState:
        """The late state; ``virtio`` is the transport's state, carried as is."""
        return VirtioMemLateState(self.usable_region_size, self.requested_size, virtio)

    def load_early(self, state: VirtioMemEarlyState) -> None:
        """Take the source's early state on a migration destination (QEMU's early post_load).

        QEMU's sanity checks first, with its messages; then the bitmap and size (no size-change
        notification, as QEMU); then, with dynamic memslots, every memslot of *this* device's
        decision that overlaps a plugged range is mapped, one transaction per plugged range,
        before any RAM arrives. If a mapping (or ``prealloc``) fails, everything this load
        mapped is unmapped again, the device is back to nothing plugged, and
        :class:`MigrationError` says why.
        """
        label = self.label
        if not self.realized or self.memdev is None:
            raise MigrationError(f"virtio-mem '{label}': not realized, cannot load its state")
        if self.size or self.bitmap.count(1):
            raise MigrationError(
                f"virtio-mem '{label}': already has plugged memory; an incoming migration "
                "needs a fresh device"
            )
        checks = (
            ("memaddr", state.addr, self.addr, "Property 'memaddr' changed from 0x{:x} to 0x{:x}"),
            (
                "memdev",
                state.region_size,
                self.region_size,
                "Property 'memdev' size changed from 0x{:x} to 0x{:x}",
            ),
            (
                "block-size",
                state.block_size,
                self.block_size,
                "Property 'block-size' changed from 0x{:x} to 0x{:x}",
            ),
            ("node", state.node, self.node, "Property 'node' changed from {} to {}"),
        )
        for _prop, theirs, ours, text in checks:
            if theirs != ours:
                raise MigrationError(f"virtio-mem '{label}': " + text.format(theirs, ours))
        bs = self.block_size
        if len(state.bitmap) != self.nb_blocks or state.bitmap.strip(b"\x00\x01"):
            raise MigrationError(
                f"virtio-mem '{label}': corrupt early state: the bitmap has "
                f"{len(state.bitmap)} entries, expected {self.nb_blocks} of 0 or 1"
            )
        plugged = state.bitmap.count(1)
        if state.size != plugged * bs:
            raise MigrationError(
                f"virtio-mem '{label}': corrupt early state: size 0x{state.size:x} but "
                f"{plugged} block(s) of 0x{bs:x} plugged"
            )
        self.bitmap[:] = state.bitmap
        self.size = state.size
        ranges = self.plugged_ranges()
        if self.dynamic:
            per_slot = self.memslot_size // bs
            self._slot_plugged = [
                state.bitmap.count(1, i * per_slot, (i + 1) * per_slot)
                for i in range(self.nb_memslots)
            ]
        try:
            if self.protects:
                # Before any page arrives (and before prealloc populates them).
                for first, count in ranges:
                    self.memdev.memory.unprotect(first * bs, count * bs)
            if self.opts.prealloc:
                for first, count in ranges:
                    self.memdev.memory.populate(first * bs, count * bs)
            if self.dynamic:
                for first, count in ranges:
                    self._map_for_load(first, count)
        except MemslotsError as exc:
            self.cancel_incoming()
            raise MigrationError(
                f"virtio-mem '{label}': cannot take the migrated plugged memory: {exc}"
            ) from exc

    def _map_for_load(self, first: int, count: int) -> None:
        """Map the memslots of one plugged range that are not mapped yet, in one transaction
        (raising the consumer's error)."""
        assert self.mr is not None
        todo = [i for i, _ in self._slot_blocks(first, count) if not self.memslots[i].mapped]
        if not todo:
            return
        with self.address_space.transaction():
            for i in todo:
                self.address_space.add_subregion(self.mr, i * self.memslot_size, self.memslots[i])

    def load_late(self, state: VirtioMemLateState, *, discard_unplugged: bool = True) -> None:
        """Take the source's late state; then discard every unplugged range, as QEMU's post_load
        does ("make sure all memory is really discarded after migration"), unless
        ``discard_unplugged`` is False (shared memory that was not copied)."""
        label = self.label
        bs = self.block_size
        for what, value in (
            ("requested-size", state.requested_size),
            ("usable region size", state.usable_region_size),
        ):
            if value % bs or value > self.region_size:
                raise MigrationError(
                    f"virtio-mem '{label}': corrupt late state: {what} 0x{value:x} is not a "
                    f"multiple of 0x{bs:x} within 0x{self.region_size:x}"
                )
        self.requested_size = state.requested_size
        self.usable_region_size = state.usable_region_size
        if not discard_unplugged:
            return
        for first, count in self.unplugged_ranges():
            if not self._discard(first * bs, count * bs):
                raise MigrationError(
                    f"virtio-mem '{label}': cannot discard the unplugged memory at "
                    f"0x{self.addr + first * bs:x} after migration"
                )

    def cancel_incoming(self, *, discard: bool = True) -> None:
        """Undo a partial load: unmap every memslot, nothing plugged, memory given back
        (unless ``discard`` is False: memory a local live update handed over is the
        source's)."""
        if self.dynamic and self.mr is not None:
            mapped = [i for i, r in enumerate(self.memslots) if r.mapped]
            if mapped and not self._set_mapped(mapped, False):
                log.warning("virtio-mem '%s': memslots stay mapped after a failed load", self.label)
            self._slot_plugged = [0] * self.nb_memslots
        self.bitmap[:] = bytes(len(self.bitmap))
        self.size = 0
        if self.memdev is not None and discard:
            self._discard(0, self.region_size)
            self._set_accessible(0, self.nb_blocks, False)

    # -- introspection -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``{"type": "virtio-mem", "data": VirtioMEMDeviceInfo}``, QEMU's fields."""
        assert self.memdev is not None, "a plugged virtio-mem device has a memdev"
        data: dict[str, Any] = {} if self.id is None else {"id": self.id}
        data.update(
            {
                "memaddr": self.addr,
                "requested-size": self.requested_size,
                "size": self.size,
                "max-size": self.region_size,
                "block-size": self.block_size,
                "node": self.node,
                "memdev": self.memdev.qom_path,
            }
        )
        return {"type": "virtio-mem", "data": data}

    def qom_objects(self) -> dict[str, QomObject]:
        """The PCI proxy and its virtio device, with the same properties."""
        return {"": self._qom_object(PROXY_TYPE), VIRTIO_CHILD: self._qom_object("virtio-mem")}

    def _qom_object(self, type_name: str) -> QomObject:
        # The proxy's properties forward to its virtio device, an anonymous "virtio-mem":
        # QEMU's refusals therefore name that device whichever path was used.
        def static(name: str) -> Callable[[object], None]:
            return refuse_after_realize(name, None, "virtio-mem")

        def set_requested(value: object) -> None:
            assert isinstance(value, int)
            self.set_requested_size(value)

        memdev = self.memdev
        assert memdev is not None, "a realized virtio-mem device has a memdev"
        return QomObject(
            type_name,
            {
                "type": QomProperty(lambda: type_name),
                "memdev": QomProperty(
                    lambda: memdev.qom_path,
                    refuse_after_realize("memdev", None, "virtio-mem", link=True),
                ),
                "memaddr": QomProperty(lambda: self.addr, static("memaddr")),
                "node": QomProperty(lambda: self.node, static("node")),
                "requested-size": QomProperty(
                    lambda: self.requested_size, set_requested, type="size"
                ),
                # Read-only on the virtio device, which the proxy's alias forwards to.
                "size": QomProperty(
                    lambda: self.size, refuse("Property 'virtio-mem.size' is not writable")
                ),
                # A realized device refuses before it looks at the value (QEMU's order).
                "block-size": QomProperty(
                    lambda: self.block_size, refuse("'block-size' cannot be changed")
                ),
                "prealloc": QomProperty(lambda: self.opts.prealloc, static("prealloc")),
                "unplugged-inaccessible": QomProperty(
                    lambda: self.unplugged_inaccessible, static("unplugged-inaccessible")
                ),
                "dynamic-memslots": QomProperty(
                    lambda: self.opts.dynamic_memslots, static("dynamic-memslots")
                ),
                "memslot-size": QomProperty(
                    lambda: self.opts.memslot_size or 0, static("memslot-size")
                ),
            },
        )

    def memslot_plan(self) -> MemslotPlan:
        """Block size, dynamic or not, and the memslots as decided."""
        memslots = self.decided_memslots
        size = self.region_size
        memslot_size = self.memslot_size if self.dynamic and memslots > 1 else size
        return MemslotPlan(
            self.block_size, self.dynamic, memslots, memslot_size, self.last_memslot_size
        )

    def memslot_map(self) -> list[MemslotInfo]:
        """Every memslot of the device, mapped or not."""
        if not self.dynamic:
            mapped = self.memdev is not None and self.memdev.region.mapped
            return [MemslotInfo(0, self.addr, self.region_size, mapped, self.nb_plugged_blocks)]
        return [
            MemslotInfo(i, self.addr + i * self.memslot_size, r.size, r.mapped, plugged)
            for i, (r, plugged) in enumerate(zip(self.memslots, self._slot_plugged, strict=True))
        ]

    def block_at(self, gpa: int) -> int | None:
        """The index of the block that holds guest-physical ``gpa``; None outside the region."""
        if not self.realized or not self.addr <= gpa < self.addr + self.region_size:
            return None
        return (gpa - self.addr) // self.block_size

    @property
    def mapped_memslots(self) -> int:
        """How many of the device's memslots are mapped now (without building the map)."""
        if not self.dynamic:
            return super().mapped_memslots
        return sum(1 for r in self.memslots if r.mapped)

    @property
    def nb_plugged_blocks(self) -> int:
        """Number of plugged blocks."""
        return self.bitmap.count(1)
