"""Host memory backends: the RAM behind guest memory, like QEMU's memory-backend-ram|memfd|file.

Every backend maps its memory once through libc's ``mmap`` (:mod:`memslots.host.libc`) rather
than Python's :mod:`mmap` module, because KVM_SET_USER_MEMORY_REGION and vhost-user need the raw
host address and because sparse multi-TiB guest memory needs ``MAP_NORESERVE``.
:meth:`HostMemory.discard` returns the memory of a range to the host the way QEMU's
``ram_block_discard_range`` does.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import tempfile

from memslots.closing import Closing
from memslots.errors import HostMemoryError
from memslots.host import libc
from memslots.host.pages import fd_page_size, host_page_size, thp_size
from memslots.sizes import format_size, is_power_of_two

__all__ = ["FileBackend", "HostMemory", "MemfdBackend", "RamBackend"]

# mincore() only defines bit 0 of each vector byte ("resident"); this table keeps just that bit.
_RESIDENT_BIT = bytes(b & 1 for b in range(256))
_MINCORE_CHUNK = 1 << 30


def _describe(id: str, size: int) -> str:
    return f"memory backend '{id}' ({format_size(size)})"


def _check_size(id: str, size: int, page_size: int) -> None:
    if size <= 0 or size % page_size:
        raise HostMemoryError(
            f"{_describe(id, size)}: size 0x{size:x} must be a positive multiple of the "
            f"backend page size 0x{page_size:x}"
        )


class HostMemory(abc.ABC, Closing):
    """One mapped host memory backend (QEMU's HostMemoryBackend with its RAMBlock).

    Subclasses create the backing object (nothing, a memfd or a file) and then call this
    constructor, which maps it. The mapping lives until :meth:`close`; it is also a context
    manager. ``host_addr`` is aligned to ``max(page_size, thp_size())``.
    """

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
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        if fd is None:
            flags |= mmap.MAP_ANONYMOUS
        if not reserve:
            flags |= libc.MAP_NORESERVE
        try:
            self._addr = libc.map_aligned(
                size,
                max(page_size, thp_size()),
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

    def discard(self, offset: int, length: int) -> None:
        """Give the host memory of ``[offset, offset + length)`` back to the host.

        Shared fd-backed memory gets a hole punched into the fd (so every mapping of it, e.g.
        a vhost-user back-end's, loses the pages), shared anonymous memory MADV_REMOVE and
        private memory MADV_DONTNEED. A private mapping of a memfd or unlinked temporary file
        also gets the hole punched, because its copy-on-write faults filled the fd; a private
        mapping of a named file leaves the file alone and reads back its contents. Both
        bounds must be multiples of :attr:`page_size`.
        """
        addr = self._range_addr("discard", offset, length, self.page_size)
        if length == 0:
            return  # fallocate() rejects an empty range; there is nothing to free anyway
        try:
            if self._fd is None and self.shared:
                # DONTNEED would only drop this process' page table entries of the shmem pages.
                libc.madvise(addr, length, mmap.MADV_REMOVE, "MADV_REMOVE")
            elif not self.shared:
                libc.madvise(addr, length, mmap.MADV_DONTNEED, "MADV_DONTNEED")
            if self._fd is not None and (self.shared or self._exclusive_fd):
                libc.punch_hole(self._fd, self.fd_offset + offset, length)
        except OSError as exc:
            raise HostMemoryError(
                f"{_describe(self.id, self.size)}: cannot discard "
                f"[0x{offset:x}, 0x{offset + length:x}): {exc}"
            ) from exc

    def populate(self, offset: int, length: int) -> None:
        """Preallocate the host memory of ``[offset, offset + length)`` (QEMU's prealloc).

        MADV_POPULATE_WRITE makes a shortage (e.g. an empty huge page pool) a
        :class:`HostMemoryError` now instead of a SIGBUS on first touch. Both bounds must be
        multiples of :attr:`page_size`.
        """
        addr = self._range_addr("populate", offset, length, self.page_size)
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
        """Copy ``length`` bytes starting at ``offset`` out of the backend."""
        # The checks inline (guests read often): _range_addr only to raise its error.
        if self._closed or length < 0 or not 0 <= offset <= self.size - length:
            self._range_addr("read", offset, length)
        return self._view[offset : offset + length].tobytes()

    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` into the backend at ``offset``."""
        ctypes.memmove(self._range_addr("write", offset, len(data)), data, len(data))

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

    def close(self) -> None:
        """Unmap the memory and close the fd. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
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


class FileBackend(HostMemory):
    """Memory of a file, like ``memory-backend-file`` (private by default, as in QEMU).

    If ``mem_path`` is a directory, an unlinked temporary file in it backs the memory;
    otherwise the file is opened or created and grown to ``size`` if it is smaller (a larger
    file is mapped from its start). On hugetlbfs, :attr:`page_size` is the huge page size.
    ``discard_data=True`` punches the file's contents away on close (only with share=on; QEMU
    uses MADV_REMOVE there, which does nothing for private mappings).
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
        temporary = os.path.isdir(self.mem_path)
        created = not temporary and not os.path.exists(self.mem_path)
        try:
            if temporary:
                fd, name = tempfile.mkstemp(
                    prefix=f"memslots_back_mem.{id.replace('/', '_')}.", dir=self.mem_path
                )
                os.unlink(name)
            else:
                fd = os.open(self.mem_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise HostMemoryError(
                f"{_describe(id, size)}: cannot open mem-path '{self.mem_path}': {exc}"
            ) from exc
        try:
            page_size = fd_page_size(fd)
            _check_size(id, size, page_size)
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
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
            os.close(fd)
            if created:  # as QEMU: a file we created for a backend that failed goes away
                with contextlib.suppress(OSError):
                    os.unlink(self.mem_path)
            if isinstance(exc, OSError):
                raise HostMemoryError(
                    f"{_describe(id, size)}: cannot set up mem-path '{self.mem_path}': {exc}"
                ) from exc
            raise

    @property
    def kind(self) -> str:
        """Always "file"."""
        return "file"

    def close(self) -> None:
        """Punch away the file's contents if ``discard_data`` (and shared), then unmap."""
        if self.closed:
            return
        try:
            if self.discard_data and self.shared:
                self.discard(0, self.size)
        finally:
            super().close()
