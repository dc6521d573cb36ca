"""Memory backend objects (``-object memory-backend-*``) as the machine sees them.

A :class:`MemoryBackend` joins the parsed options, the host memory behind them and the RAM
region that devices map. It also remembers whether a device already uses it (QEMU's "busy").
For planning, :class:`PlannedMemory` stands in for host memory that is described but never
mapped, so that ``memslots plan`` can describe machines larger than this host, at fake host
addresses that each machine hands out itself (:class:`PlannedAddresses`).
"""

from __future__ import annotations

import os

from memslots.errors import ConfigError, HostMemoryError
from memslots.host.memory import (
    QEMU_VMALLOC_ALIGN,
    FileBackend,
    HostMemory,
    MemfdBackend,
    RamBackend,
)
from memslots.host.pages import HostPages, host_page_size, hugetlbfs_page_size
from memslots.memory.address_space import MemoryRegion, RamBlock
from memslots.options import BackendOptions
from memslots.sizes import GiB, align_up

#: QEMU aligns anonymous guest RAM's region so that THP can back it.
ANON_RAM_ALIGN = QEMU_VMALLOC_ALIGN


class PlannedAddresses:
    """Fake host addresses for the planned memory of one machine: distinct, 1 GiB aligned and
    non-overlapping inside the user address range, which is all KVM checks of them.

    Each machine has its own, so a process that plans again and again never runs out of them.
    """

    FIRST = GiB

    def __init__(self) -> None:
        self._next = self.FIRST

    def take(self, size: int) -> int:
        """An address for ``size`` bytes that no earlier one overlaps."""
        addr = self._next
        self._next = align_up(addr + size, GiB)
        return addr


class PlannedMemory:
    """Host memory that is described but not mapped: what ``memslots plan`` works with.

    ``page_size`` defaults to this process's base page, ``host_addr`` to the first fake address
    (:class:`PlannedAddresses` hands out distinct ones; :func:`create_backend` uses it).
    """

    def __init__(
        self, opts: BackendOptions, *, page_size: int | None = None, host_addr: int | None = None
    ) -> None:
        self.id = opts.id
        self.size = opts.size
        self.kind = opts.qom_type.removeprefix("memory-backend-")
        self.shared = opts.share
        self.page_size = page_size if page_size is not None else host_page_size()
        self.host_addr = host_addr if host_addr is not None else PlannedAddresses.FIRST
        self.fd: int | None = None
        self.fd_offset = 0

    @property
    def fd_backed(self) -> bool:
        """memfd and file memory would have an fd for vhost-user back-ends."""
        return self.kind != "ram"

    def discard(self, offset: int, length: int) -> None:
        """Nothing is mapped, so nothing is given back."""

    def populate(self, offset: int, length: int) -> None:
        """Nothing is mapped, so nothing is allocated."""

    def protect(self, offset: int, length: int) -> None:
        """Nothing is mapped, so nothing is protected."""

    def unprotect(self, offset: int, length: int) -> None:
        """Nothing is mapped, so nothing is protected."""

    def check_access(self, offset: int, length: int) -> None:
        """Nothing is protected (there is nothing to reach either)."""

    @property
    def access_generation(self) -> int:
        """Always 0: nothing is ever protected."""
        return 0

    def read(self, offset: int, length: int) -> bytes:
        """Planned memory has no contents."""
        raise HostMemoryError(f"memory backend '{self.id}' is only planned: it has no contents")

    def write(self, offset: int, data: bytes) -> None:
        """Planned memory has no contents."""
        raise HostMemoryError(f"memory backend '{self.id}' is only planned: it has no contents")

    def close(self) -> None:
        """Nothing to release."""


def _planned_page_size(opts: BackendOptions, pages: HostPages) -> int:
    if opts.qom_type == "memory-backend-memfd" and opts.hugetlb:
        return opts.hugetlbsize or pages.huge_page_size
    if opts.qom_type == "memory-backend-file" and opts.mem_path:
        # The user named the file: its filesystem says whether it has huge pages.
        path = opts.mem_path if os.path.isdir(opts.mem_path) else os.path.dirname(opts.mem_path)
        return hugetlbfs_page_size(path or ".") or pages.page_size
    return pages.page_size


class MemoryBackend:
    """One ``-object memory-backend-*``: options, host memory and its RAM region."""

    def __init__(self, opts: BackendOptions, memory: RamBlock) -> None:
        self.opts = opts
        self.memory = memory
        # QEMU aligns anonymous RAM for THP; fd-backed memory only to its page size.
        align = ANON_RAM_ALIGN if opts.qom_type == "memory-backend-ram" else memory.page_size
        self.region = MemoryRegion.ram(opts.id, memory, align=max(align, memory.page_size))
        #: Set while a device uses the backend; a second device is refused ("busy").
        self.used_by: str | None = None

    @property
    def id(self) -> str:
        """The object id."""
        return self.opts.id

    @property
    def size(self) -> int:
        """Bytes of memory."""
        return self.opts.size

    @property
    def qom_path(self) -> str:
        """Canonical QOM path, as ``query-memory-devices`` reports it."""
        return f"/objects/{self.opts.id}"

    @property
    def prealloc(self) -> bool:
        """Whether the backend was asked to preallocate its memory."""
        return self.opts.prealloc

    def close(self) -> None:
        """Release the host memory."""
        close = getattr(self.memory, "close", None)
        if close is not None:
            close()

    def abandon(self) -> None:
        """Release the host memory of a backend that is thrown away unused (the machine could
        not be built), leaving a ``mem-path`` file as it was before (:meth:`HostMemory.revert`)."""
        if isinstance(self.memory, HostMemory):
            self.memory.revert()
        else:
            self.close()


def create_backend(
    opts: BackendOptions,
    *,
    pages: HostPages,
    planned: bool = False,
    addresses: PlannedAddresses | None = None,
) -> MemoryBackend:
    """Create the host memory an ``-object`` describes, on a host with these ``pages`` (or, if
    ``planned``, a stand-in at a fake address from ``addresses``)."""
    if planned:
        host_addr = (addresses or PlannedAddresses()).take(opts.size)
        page_size = _planned_page_size(opts, pages)
        return MemoryBackend(opts, PlannedMemory(opts, page_size=page_size, host_addr=host_addr))
    memory: HostMemory
    if opts.qom_type == "memory-backend-ram":
        memory = RamBackend(opts.id, opts.size, share=opts.share, reserve=opts.reserve)
    elif opts.qom_type == "memory-backend-memfd":
        memory = MemfdBackend(
            opts.id,
            opts.size,
            share=opts.share,
            reserve=opts.reserve,
            hugetlb=opts.hugetlb,
            hugetlbsize=opts.hugetlbsize,
            seal=opts.seal,
        )
    elif opts.qom_type == "memory-backend-file":
        assert opts.mem_path is not None
        memory = FileBackend(
            opts.id, opts.size, opts.mem_path, share=opts.share, reserve=opts.reserve
        )
    else:
        raise ConfigError(f"object '{opts.id}': unsupported type '{opts.qom_type}'")
    if opts.prealloc:
        try:
            memory.populate(0, align_up(opts.size, memory.page_size))
        except Exception:
            memory.revert()
            raise
    return MemoryBackend(opts, memory)
