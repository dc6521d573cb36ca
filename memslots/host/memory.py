"""Host memory backends: the RAM behind guest memory, like QEMU's memory-backend-ram|memfd|file.

Every backend maps its memory once through libc's ``mmap`` (:mod:`memslots.host.libc`) rather
than Python's :mod:`mmap` module, because KVM_SET_USER_MEMORY_REGION and vhost-user need the raw
host address and because sparse multi-TiB guest memory needs ``MAP_NORESERVE``.
:meth:`HostMemory.discard` returns the memory of a range to the host the way QEMU's
``ram_block_discard_range`` does. :meth:`HostMemory.protect` takes ranges out of reach
(``PROT_NONE``: virtio-mem's unplugged blocks); :meth:`HostMemory.read`, :meth:`HostMemory.write`
and :meth:`HostMemory.populate` refuse them instead of faulting.
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import tempfile
from collections.abc import Callable

from memslots.closing import Closing
from memslots.errors import HostMemoryError, InaccessibleMemoryError
from memslots.host import libc
from memslots.host.pages import fd_page_size, host_page_size
from memslots.sizes import MiB, format_size, hex_size, is_power_of_two

__all__ = [
    "QEMU_VMALLOC_ALIGN",
    "FileBackend",
    "HostMemory",
    "MemfdBackend",
    "RamBackend",
    "last_access_change",
]

#: QEMU (x86-64 Linux builds) maps guest RAM at least this aligned, so that transparent huge
#: pages can back it: a constant of QEMU's build, not a fact of the host.
QEMU_VMALLOC_ALIGN = 2 * MiB

# mincore() only defines bit 0 of each vector byte ("resident"); this table keeps just that bit.
_RESIDENT_BIT = bytes(b & 1 for b in range(256))
_MINCORE_CHUNK = 1 << 30


_last_access_change = 0


def _access_changed() -> int:
    """The next number of the process-wide sequence of access changes."""
    global _last_access_change
    _last_access_change += 1
    return _last_access_change


def last_access_change() -> int:
    """The :attr:`HostMemory.access_generation` most recently given to any memory: whoever
    keeps views of several memories checks them one by one only when this moved."""
    return _last_access_change


def _describe(id: str, size: int) -> str:
    return f"memory backend '{id}' ({format_size(size)})"


def _check_size(id: str, size: int, page_size: int) -> None:
    if size <= 0 or size % page_size:
        raise HostMemoryError(
            f"{_describe(id, size)}: size {hex_size(size)} must be a positive multiple of the "
            f"backend page size {hex_size(page_size)}"
        )


class _Ranges:
    """Disjoint, sorted half-open ranges ``[start, end)``; touching ranges are merged."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, lo: int, hi: int) -> None:
        """Include ``[lo, hi)``."""
        i = bisect.bisect_left(self.ends, lo)  # first range that ends at or after lo
        j = bisect.bisect_right(self.starts, hi)  # ranges from i to j touch [lo, hi)
        if i < j:
            lo, hi = min(lo, self.starts[i]), max(hi, self.ends[j - 1])
        self.starts[i:j] = [lo]
        self.ends[i:j] = [hi]

    def remove(self, lo: int, hi: int) -> None:
        """Exclude ``[lo, hi)``."""
        i = bisect.bisect_right(self.ends, lo)  # first range that ends after lo
        j = bisect.bisect_left(self.starts, hi)  # ranges from i to j overlap [lo, hi)
        if i >= j:
            return
        starts, ends = [], []
        if self.starts[i] < lo:
            starts.append(self.starts[i])
            ends.append(lo)
        if self.ends[j - 1] > hi:
            starts.append(hi)
            ends.append(self.ends[j - 1])
        self.starts[i:j] = starts
        self.ends[i:j] = ends

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether any byte of ``[lo, hi)`` is included."""
        i = bisect.bisect_right(self.ends, lo)
        return i < len(self.starts) and self.starts[i] < hi

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The included parts of ``[lo, hi)`` as ``(start, end)``."""
        i = bisect.bisect_right(self.ends, lo)
        out = []
        while i < len(self.starts) and self.starts[i] < hi:
            out.append((max(lo, self.starts[i]), min(hi, self.ends[i])))
            i += 1
        return out

    def total(self) -> int:
        """Bytes included."""
        return sum(self.ends) - sum(self.starts)


class HostMemory(abc.ABC, Closing):
    """One mapped host memory backend (QEMU's HostMemoryBackend with its RAMBlock).

    Subclasses create the backing object (nothing, a memfd or a file) and then call this
    constructor, which maps it. The mapping lives until :meth:`close`; it is also a context
    manager. ``host_addr`` is aligned to ``max(page_size, QEMU_VMALLOC_ALIGN)``, as QEMU maps it.
    """

    #: Told ``(offset, length)`` after every :meth:`write`: how a VMM-side dirty tracker
    #: (:class:`memslots.migration.dirty.DirtyTracker`) learns of writes KVM does not log.
    write_hook: Callable[[int, int], None] | None = None

    def __init__(
        self,
        id: str,
        size: int,
        *,
        shared: bool,
        reserve: bool,
        fd: int | None,
        page_size: int,
        exclusive_fd: bool = False,
    ) -> None:
        """Map ``size`` bytes of ``fd`` (anonymous memory if None); ``reserve=False`` maps
        with MAP_NORESERVE. ``exclusive_fd`` says that no one else can open the fd's file
        (memfd, unlinked temporary file), so discard may punch holes even into a private
        mapping's fd. The caller keeps ownership of ``fd`` if this raises."""
        self.id = id
        self.size = size
        self.page_size = page_size
        self.shared = shared
        self.reserve = reserve
        self._fd = fd
        self._exclusive_fd = exclusive_fd
        self._closed = False
        #: A superset of what is PROT_NONE now (see :meth:`protect`).
        self._protected = _Ranges()
        self._access_generation = 0
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        if fd is None:
            flags |= mmap.MAP_ANONYMOUS
        if not reserve:
            flags |= libc.MAP_NORESERVE
        try:
            self._addr = libc.map_aligned(
                size,
                max(page_size, QEMU_VMALLOC_ALIGN),
                mmap.PROT_READ | mmap.PROT_WRITE,
                flags,
                -1 if fd is None else fd,
            )
        except OSError as exc:
            if exc.errno == errno.ENOMEM and reserve:
                raise HostMemoryError(
                    f"{_describe(id, size)}: cannot map 0x{size:x} bytes: the host can't "
                    f"reserve that much memory ({exc}); use reserve=off to map it without "
                    "reserving swap space or huge pages"
                ) from exc
            raise HostMemoryError(
                f"{_describe(id, size)}: cannot map 0x{size:x} bytes: {exc}"
            ) from exc
        # Reads slice this view: a memoryview copy costs a fraction of a ctypes call.
        self._view = memoryview((ctypes.c_ubyte * size).from_address(self._addr)).cast("B")
        if page_size == host_page_size():
            # Like QEMU, ask for THP on all guest RAM (in THP "madvise" mode nothing else
            # would) and ignore failure: without THP the memory is slower, not broken.
            libc.madvise_hint(self._addr, size, mmap.MADV_HUGEPAGE)

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """Backend type: "ram", "memfd" or "file"."""

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def host_addr(self) -> int:
        """Host virtual address of the mapping (for KVM and vhost-user memory tables)."""
        self._check_open()
        return self._addr

    @property
    def fd(self) -> int | None:
        """File descriptor to hand to vhost-user back-ends; None for anonymous memory."""
        self._check_open()
        return self._fd

    @property
    def fd_backed(self) -> bool:
        """True if the memory has an fd that another process (a vhost back-end) can map."""
        return self._fd is not None

    @property
    def fd_offset(self) -> int:
        """Offset of the mapping within :attr:`fd`; backends always map from offset 0."""
        return 0

    def adopt(self, fd: int) -> None:
        """Map ``fd`` (another process's memory of this backend, received for a local live
        update) in place of our own, at the same host address, and take ownership of it.

        Only shared fd-backed memory can be adopted; the fd must be as large and have the
        same page size. Every consumer keeps its address: KVM's memslots follow the new pages
        through the MMU notifier; vhost-user back-ends got our old fd and must be sent the
        new one. Our own old fd is closed (its memory, never used, goes with it). Protected
        ranges stay out of reach. On error before the fd is mapped nothing changed and ``fd``
        is still the caller's.
        """
        self._check_open()
        what = _describe(self.id, self.size)
        if self._fd is None or not self.shared:
            raise HostMemoryError(
                f"{what}: only shared memory with an fd (share=on) can be adopted"
            )
        try:
            st = os.fstat(fd)
            page_size = fd_page_size(fd)
        except (OSError, HostMemoryError) as exc:
            raise HostMemoryError(f"{what}: cannot adopt fd {fd}: {exc}") from exc
        if st.st_size < self.fd_offset + self.size:
            raise HostMemoryError(
                f"{what}: cannot adopt fd {fd}: it holds 0x{st.st_size:x} bytes, not "
                f"0x{self.size:x}"
            )
        if page_size != self.page_size:
            raise HostMemoryError(
                f"{what}: cannot adopt fd {fd}: its page size is 0x{page_size:x}, not "
                f"0x{self.page_size:x}"
            )
        flags = mmap.MAP_SHARED | (0 if self.reserve else libc.MAP_NORESERVE)
        try:
            libc.remap_fixed(self._addr, self.size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd)
        except OSError as exc:
            raise HostMemoryError(f"{what}: cannot map the adopted fd {fd}: {exc}") from exc
        old, self._fd = self._fd, fd
        self._exclusive_fd = False  # another process holds it too
        os.close(old)
        # The new mapping is all read/write: what was out of reach must stay so (the ranges
        # count as protected even if this fails, as in protect()).
        for lo, hi in self._protected.pieces(0, self.size):
            try:
                libc.mprotect(self._addr + lo, hi - lo, libc.PROT_NONE)
            except OSError as exc:
                raise HostMemoryError(
                    f"{what}: adopted fd {fd}, but cannot make [0x{lo:x}, 0x{hi:x}) "
                    f"inaccessible again: {exc}"
                ) from exc

    def discard(self, offset: int, length: int) -> None:
        """Give the host memory of ``[offset, offset + length)`` back to the host.

        Shared fd-backed memory gets a hole punched into the fd (so every mapping of it, e.g.
        a vhost-user back-end's, loses the pages), shared anonymous memory MADV_REMOVE and
        private memory MADV_DONTNEED. A private mapping of a memfd or unlinked temporary file
        also gets the hole punched, because its copy-on-write faults filled the fd; a private
        mapping of a named file leaves the file alone and reads back its contents. Protected
        ranges are discarded too. Both bounds must be multiples of :attr:`page_size`.
        """
        addr = self._range_addr("discard", offset, length, self.page_size)
        if length == 0:
            return  # fallocate() rejects an empty range; there is nothing to free anyway
        try:
            if self._fd is None and self.shared:
                # DONTNEED would only drop this process' page table entries of the shmem pages.
                self._madvise_remove(offset, length)
            elif not self.shared:
                libc.madvise(addr, length, mmap.MADV_DONTNEED, "MADV_DONTNEED")
            if self._fd is not None and (self.shared or self._exclusive_fd):
                libc.punch_hole(self._fd, self.fd_offset + offset, length)
        except OSError as exc:
            raise HostMemoryError(
                f"{_describe(self.id, self.size)}: cannot discard "
                f"[0x{offset:x}, 0x{offset + length:x}): {exc}"
            ) from exc

    def _madvise_remove(self, offset: int, length: int) -> None:
        addr = self._addr + offset
        try:
            libc.madvise(addr, length, mmap.MADV_REMOVE, "MADV_REMOVE")
        except OSError as exc:
            protected = self._protected.pieces(offset, offset + length)
            if exc.errno != errno.EACCES or not protected:
                raise
            # Older kernels want a writable mapping for MADV_REMOVE (this one only a shared
            # mapping that may become writable): open the protected parts for the call alone.
            for lo, hi in protected:
                libc.mprotect(self._addr + lo, hi - lo, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                libc.madvise(addr, length, mmap.MADV_REMOVE, "MADV_REMOVE")
            finally:
                for lo, hi in protected:
                    libc.mprotect(self._addr + lo, hi - lo, libc.PROT_NONE)

    def protect(self, offset: int, length: int) -> None:
        """Take ``[offset, offset + length)`` out of reach: ``mprotect(PROT_NONE)``.

        Everyone who reaches the memory through this mapping is refused: KVM then fails a
        vCPU's access to it instead of allocating host memory (see ``docs/DESIGN.md``), and
        :meth:`read`, :meth:`write` and :meth:`populate` raise
        :class:`InaccessibleMemoryError` rather than fault. Other mappings of the fd (a
        vhost-user back-end's) are not affected. :meth:`discard` still works. Both bounds must
        be multiples of :attr:`page_size`.

        The range counts as protected even if mprotect fails (it may have changed part of it),
        so that nothing of ours ever copies into a page that might be PROT_NONE.
        """
        addr = self._range_addr("protect", offset, length, self.page_size)
        if length == 0:
            return
        self._protected.add(offset, offset + length)
        self._access_generation = _access_changed()
        try:
            libc.mprotect(addr, length, libc.PROT_NONE)
        except OSError as exc:
            raise HostMemoryError(
                f"{_describe(self.id, self.size)}: cannot make "
                f"[0x{offset:x}, 0x{offset + length:x}) inaccessible: {exc}"
            ) from exc

    def unprotect(self, offset: int, length: int) -> None:
        """Bring ``[offset, offset + length)`` back into reach (read/write).

        If mprotect fails the range still counts as protected. Both bounds must be multiples
        of :attr:`page_size`.
        """
        addr = self._range_addr("unprotect", offset, length, self.page_size)
        if length == 0:
            return
        try:
            libc.mprotect(addr, length, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise HostMemoryError(
                f"{_describe(self.id, self.size)}: cannot make "
                f"[0x{offset:x}, 0x{offset + length:x}) accessible again: {exc}"
            ) from exc
        self._protected.remove(offset, offset + length)
        self._access_generation = _access_changed()

    def inaccessible(self, offset: int, length: int) -> bool:
        """Whether any byte of ``[offset, offset + length)`` is protected."""
        return self._protected.overlaps(offset, offset + length)

    def check_access(self, offset: int, length: int) -> None:
        """Raise :class:`InaccessibleMemoryError` if any byte of the range is protected."""
        if self._protected.starts and self._protected.overlaps(offset, offset + length):
            lo = self._protected.pieces(offset, offset + length)[0][0]
            raise InaccessibleMemoryError(
                f"{_describe(self.id, self.size)}: [0x{offset:x}, 0x{offset + length:x}) "
                f"is inaccessible at 0x{lo:x} (unplugged memory is out of reach)"
            )

    @property
    def protected_bytes(self) -> int:
        """Bytes that are protected now."""
        return self._protected.total()

    @property
    def access_generation(self) -> int:
        """Changes whenever a range is protected or unprotected, and on close: whoever keeps
        a view of the memory checks again when it moved."""
        return self._access_generation

    def populate(self, offset: int, length: int) -> None:
        """Preallocate the host memory of ``[offset, offset + length)`` (QEMU's prealloc).

        MADV_POPULATE_WRITE makes a shortage (e.g. an empty huge page pool) a
        :class:`HostMemoryError` now instead of a SIGBUS on first touch. Both bounds must be
        multiples of :attr:`page_size`; a protected range is refused.
        """
        addr = self._range_addr("populate", offset, length, self.page_size)
        self.check_access(offset, length)
        try:
            libc.madvise(addr, length, libc.MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")
        except OSError as exc:
            # The kernel reports a page it could not supply as EFAULT (huge pages) or ENOMEM.
            hint = (
                "the host could not supply the memory"
                if exc.errno in (errno.EFAULT, errno.ENOMEM)
                else "failed"
            )
            raise HostMemoryError(
                f"{_describe(self.id, self.size)}: cannot preallocate "
                f"[0x{offset:x}, 0x{offset + length:x}): {hint} ({exc})"
            ) from exc

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes starting at ``offset`` out of the backend (refused for a
        protected range)."""
        # The checks inline (guests read often): _range_addr only to raise its error.
        if self._closed or length < 0 or not 0 <= offset <= self.size - length:
            self._range_addr("read", offset, length)
        self.check_access(offset, length)
        return self._view[offset : offset + length].tobytes()

    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` into the backend at ``offset`` (refused for a protected range)."""
        addr = self._range_addr("write", offset, len(data))
        self.check_access(offset, len(data))
        ctypes.memmove(addr, data, len(data))
        if self.write_hook is not None:
            self.write_hook(offset, len(data))

    def resident_bytes(self, offset: int = 0, length: int | None = None) -> int:
        """Bytes of ``[offset, offset + length)`` that are resident in host RAM (mincore).

        The range defaults to the rest of the backend and must be host page aligned. For
        fd-backed memory this counts the fd's page cache, as mincore() does; the kernel then
        looks up every page, so for huge memfd/file ranges prefer :meth:`allocated_bytes`.
        """
        if length is None:
            length = self.size - offset
        addr = self._range_addr("resident_bytes", offset, length, host_page_size())
        page = host_page_size()
        vec = (ctypes.c_ubyte * (_MINCORE_CHUNK // page))()
        resident_pages = 0
        for chunk_addr in range(addr, addr + length, _MINCORE_CHUNK):
            chunk_len = min(_MINCORE_CHUNK, addr + length - chunk_addr)
            try:
                libc.mincore(chunk_addr, chunk_len, vec)
            except OSError as exc:
                raise HostMemoryError(f"{_describe(self.id, self.size)}: {exc}") from exc
            resident_pages += bytes(vec)[: chunk_len // page].translate(_RESIDENT_BIT).count(1)
        return resident_pages * page

    def allocated_bytes(self) -> int:
        """Bytes the backing fd has allocated (``st_blocks * 512``); needs an fd."""
        fd = self.fd
        if fd is None:
            raise HostMemoryError(
                f"{_describe(self.id, self.size)} is anonymous memory without an fd; "
                "use resident_bytes() instead"
            )
        return os.fstat(fd).st_blocks * 512

    def revert(self) -> None:
        """Close a backend that is thrown away before use, undoing what creating it did to
        the host beyond the mapping (only a file backend changes something: its file)."""
        self.close()

    def close(self) -> None:
        """Unmap the memory and close the fd. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._access_generation = _access_changed()
        try:
            libc.munmap(self._addr, self.size)
        except OSError as exc:
            raise HostMemoryError(f"{_describe(self.id, self.size)}: {exc}") from exc
        finally:
            if self._fd is not None:
                os.close(self._fd)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at 0x{self._addr:x}"
        return (
            f"<{type(self).__name__} id={self.id!r} size={format_size(self.size)} "
            f"page_size=0x{self.page_size:x} shared={self.shared} {state}>"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise HostMemoryError(f"{_describe(self.id, self.size)} is closed")

    def _range_addr(self, what: str, offset: int, length: int, alignment: int = 1) -> int:
        """Host address of ``offset`` after checking that the range is valid for ``what``."""
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise HostMemoryError(
                f"{_describe(self.id, self.size)}: {what} range [0x{offset:x}, "
                f"0x{offset + length:x}) is not inside the backend [0x0, 0x{self.size:x})"
            )
        if offset % alignment or length % alignment:
            raise HostMemoryError(
                f"{_describe(self.id, self.size)}: {what} range [0x{offset:x}, "
                f"0x{offset + length:x}) must start and end on a 0x{alignment:x} page boundary"
            )
        return self._addr + offset


class RamBackend(HostMemory):
    """Anonymous memory, like ``memory-backend-ram``.

    ``share=True`` maps shared anonymous memory (still without an fd); ``reserve=False`` maps
    with MAP_NORESERVE so that huge sparse backends need no swap reservation.
    """

    def __init__(self, id: str, size: int, *, share: bool = False, reserve: bool = True) -> None:
        """Map ``size`` bytes of anonymous memory; raises :class:`HostMemoryError`."""
        _check_size(id, size, host_page_size())
        super().__init__(
            id, size, shared=share, reserve=reserve, fd=None, page_size=host_page_size()
        )

    @property
    def kind(self) -> str:
        """Always "ram"."""
        return "ram"


class MemfdBackend(HostMemory):
    """Memory of an anonymous memfd, like ``memory-backend-memfd`` (shared by default).

    ``hugetlb=True`` creates a hugetlb memfd with ``hugetlbsize`` pages (the kernel's default
    huge page size if None). ``seal=True`` seals the size (F_SEAL_GROW, F_SEAL_SHRINK and
    F_SEAL_SEAL, as QEMU does) so that a vhost-user back-end can trust it.
    """

    def __init__(
        self,
        id: str,
        size: int,
        *,
        share: bool = True,
        reserve: bool = True,
        hugetlb: bool = False,
        hugetlbsize: int | None = None,
        seal: bool = True,
    ) -> None:
        """Create, size and map the memfd; raises :class:`HostMemoryError`."""
        flags = os.MFD_CLOEXEC
        if seal:
            flags |= os.MFD_ALLOW_SEALING
        if hugetlbsize is not None:
            if not hugetlb:
                raise HostMemoryError(f"{_describe(id, size)}: hugetlbsize requires hugetlb=on")
            if not is_power_of_two(hugetlbsize):
                raise HostMemoryError(
                    f"{_describe(id, size)}: hugetlbsize 0x{hugetlbsize:x} is not a power of two"
                )
        if hugetlb:
            flags |= os.MFD_HUGETLB
            if hugetlbsize is not None:
                flags |= (hugetlbsize.bit_length() - 1) << os.MFD_HUGE_SHIFT
        self._hugetlb = hugetlb
        try:
            # memfd names are limited to 249 bytes; 60 characters fit in any encoding.
            fd = os.memfd_create(f"memslots:{id}"[:60], flags)
        except OSError as exc:
            raise HostMemoryError(f"{_describe(id, size)}: cannot create memfd: {exc}") from exc
        try:
            page_size = fd_page_size(fd)
            _check_size(id, size, page_size)
            os.ftruncate(fd, size)
            if seal:
                fcntl.fcntl(
                    fd,
                    fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
                )
            super().__init__(
                id,
                size,
                shared=share,
                reserve=reserve,
                fd=fd,
                page_size=page_size,
                exclusive_fd=True,
            )
        except OSError as exc:
            os.close(fd)
            raise HostMemoryError(f"{_describe(id, size)}: cannot set up memfd: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise

    @property
    def kind(self) -> str:
        """Always "memfd"."""
        return "memfd"

    @property
    def hugetlb(self) -> bool:
        """True for a hugetlb memfd."""
        return self._hugetlb


#: File systems whose regular files are kernel interfaces, not storage (statfs magic numbers):
#: growing or mapping one as guest RAM would write into the kernel's settings.
_PSEUDO_FILE_SYSTEMS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x62656570: "configfs",
    0xCAFE4A11: "bpf",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0xF97CFF8C: "selinuxfs",
    0x65735543: "fusectl",
    0x42494E4D: "binfmt_misc",
}
_FILE_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def _check_mem_path(id: str, size: int, path: str) -> os.stat_result | None:
    """Refuse a ``mem-path`` that is neither a regular file nor a directory, before anything is
    opened for writing. Returns its stat (following symlinks), or None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise HostMemoryError(
                f"{_describe(id, size)}: mem-path '{path}' is a dangling symbolic link"
            ) from None
        return None
    except OSError as exc:
        raise HostMemoryError(
            f"{_describe(id, size)}: cannot open mem-path '{path}': {exc}"
        ) from exc
    if stat.S_ISDIR(st.st_mode):
        return st
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise HostMemoryError(
            f"{_describe(id, size)}: mem-path '{path}' is {kind}, not a regular file or a directory"
        )
    try:
        fs = _PSEUDO_FILE_SYSTEMS.get(libc.statfs(path)[0])
    except OSError as exc:
        raise HostMemoryError(f"{_describe(id, size)}: cannot examine '{path}': {exc}") from exc
    if fs is not None:
        raise HostMemoryError(
            f"{_describe(id, size)}: mem-path '{path}' is on {fs}, whose files are kernel "
            "interfaces, not memory"
        )
    return st


class FileBackend(HostMemory):
    """Memory of a file, like ``memory-backend-file`` (private by default, as in QEMU).

    If ``mem_path`` is a directory, an unlinked temporary file in it backs the memory. Otherwise
    the file is opened, or created; QEMU's rules about its size keep existing data intact: an
    empty (or new) file is grown to ``size``, a larger one is mapped from its start, and a
    non-empty file smaller than ``size`` is refused, untouched. Anything that is not a regular
    file or a directory (devices, FIFOs, sockets, files of /proc or /sys) is refused before it
    is opened. If creating the backend fails, the file is left as it was (a file created for it
    is removed, an empty file grown for it is emptied again, with its times); :meth:`revert`
    does the same for a backend that is thrown away later. On hugetlbfs, :attr:`page_size` is
    the huge page size. ``discard_data=True`` punches the file's contents away on close (only
    with share=on; QEMU uses MADV_REMOVE there, which does nothing for private mappings).
    """

    def __init__(
        self,
        id: str,
        size: int,
        mem_path: str | os.PathLike[str],
        *,
        share: bool = False,
        reserve: bool = True,
        discard_data: bool = False,
    ) -> None:
        """Open or create the file and map it; raises :class:`HostMemoryError`."""
        self.mem_path = os.fspath(mem_path)
        self.discard_data = discard_data
        existing = _check_mem_path(id, size, self.mem_path)
        temporary = existing is not None and stat.S_ISDIR(existing.st_mode)
        #: The named file as it was before we opened it (None: we created it).
        self._before = None if temporary else existing
        self._created = False
        self._grown = False
        fd = self._open(id, size, temporary)
        try:
            page_size = fd_page_size(fd)
            _check_size(id, size, page_size)
            file_size = os.fstat(fd).st_size
            if 0 < file_size < size:
                # QEMU's text; the file keeps its data (QEMU only ever grows an empty file).
                raise HostMemoryError(
                    f"backing store size 0x{file_size:x} does not match 'size' option "
                    f"0x{size:x}: {_describe(id, size)}, mem-path '{self.mem_path}' is left "
                    "as it is"
                )
            if file_size == 0:
                os.ftruncate(fd, size)
                self._grown = True
            super().__init__(
                id,
                size,
                shared=share,
                reserve=reserve,
                fd=fd,
                page_size=page_size,
                exclusive_fd=temporary,
            )
        except BaseException as exc:
            self._restore_file(fd)
            os.close(fd)
            if isinstance(exc, OSError):
                raise HostMemoryError(
                    f"{_describe(id, size)}: cannot set up mem-path '{self.mem_path}': {exc}"
                ) from exc
            raise

    def _open(self, id: str, size: int, temporary: bool) -> int:
        path = self.mem_path
        try:
            if temporary:
                fd, name = tempfile.mkstemp(
                    prefix=f"memslots_back_mem.{id.replace('/', '_')}.", dir=path
                )
                os.unlink(name)
                return fd
            if self._before is None:
                # O_EXCL: if someone created it since we looked, we must not take it as ours.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                self._created = True
                return fd
            # O_NONBLOCK | O_NOCTTY: harmless for a file, and keep a FIFO or terminal swapped in
            # since we looked from blocking the open or becoming ours.
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise HostMemoryError(
                f"{_describe(id, size)}: cannot open mem-path '{path}': {exc}"
            ) from exc
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self._before.st_dev, self._before.st_ino):
            os.close(fd)
            raise HostMemoryError(
                f"{_describe(id, size)}: mem-path '{path}' was replaced while it was opened"
            )
        return fd

    def _restore_file(self, fd: int) -> None:
        """Undo what creating the backend did to the named file (best effort: it runs on the
        way out of a failure, whose error is the one to report)."""
        with contextlib.suppress(OSError):
            if self._created:
                st, now = os.fstat(fd), os.stat(self.mem_path)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    os.unlink(self.mem_path)
            elif self._grown and self._before is not None:
                os.ftruncate(fd, 0)
                os.utime(fd, ns=(self._before.st_atime_ns, self._before.st_mtime_ns))

    @property
    def kind(self) -> str:
        """Always "file"."""
        return "file"

    def revert(self) -> None:
        """Close, leaving the named file as it was before the backend (see the class)."""
        if self.closed:
            return
        fd = self._fd
        assert fd is not None
        self._restore_file(fd)
        self.discard_data = False  # an emptied or removed file has nothing left to punch
        self.close()

    def close(self) -> None:
        """Punch away the file's contents if ``discard_data`` (and shared), then unmap."""
        if self.closed:
            return
        try:
            if self.discard_data and self.shared:
                self.discard(0, self.size)
        finally:
            super().close()
