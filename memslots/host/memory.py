"""Host memory backends: the RAM behind guest memory, like QEMU's memory-backend-ram|memfd|file.

Every backend maps its memory once through libc's ``mmap`` (via ctypes) rather than Python's
:mod:`mmap` module, because KVM_SET_USER_MEMORY_REGION and vhost-user need the raw host address
and because sparse multi-TiB guest memory needs ``MAP_NORESERVE``. :meth:`HostMemory.discard`
returns the memory of a range to the host the way QEMU's ``ram_block_discard_range`` does.

The module also probes the transparent huge page (THP) size and derives virtio-mem's default
block size from a backend, as QEMU's ``virtio_mem_thp_size`` and
``virtio_mem_default_block_size`` do.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import platform
import re
import tempfile
from collections.abc import Callable
from typing import Protocol

from memslots.closing import Closing
from memslots.errors import HostMemoryError
from memslots.sizes import U64_MAX, KiB, MiB, align_up, format_size, is_power_of_two

__all__ = [
    "FileBackend",
    "HostMemory",
    "MemfdBackend",
    "RamBackend",
    "default_block_size",
    "host_page_size",
    "hugetlbfs_page_size",
    "probe_thp_size",
    "thp_size",
]

logger = logging.getLogger("memslots.host.memory")

_MACHINE = platform.machine()

# Linux constants that Python 3.11's mmap/os modules do not export.
_PROT_NONE = 0
_MAP_FIXED = 0x10
if _MACHINE.startswith(("ppc", "powerpc", "sparc")):
    _MAP_NORESERVE = 0x40
elif _MACHINE.startswith("mips"):
    _MAP_NORESERVE = 0x400
else:
    _MAP_NORESERVE = 0x4000
_MADV_POPULATE_WRITE = 23  # Linux 5.14
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_HUGETLBFS_MAGIC = 0x958458F6

# Smallest virtio-mem block size; also QEMU's THP size when the host has no THP at all.
_MIN_BLOCK_SIZE = MiB

# For the plain symbols (not the *64 ones) off_t is a C long on every Linux ABI.
_off_t = ctypes.c_long
_MAP_FAILED = (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    _off_t,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, _off_t, _off_t]


# statfs's __fsword_t is a long everywhere except s390x, where glibc declares unsigned int.
_fsword_t = ctypes.c_uint if _MACHINE == "s390x" else ctypes.c_long


class _StatfsHead(ctypes.Structure):
    """The two leading fields of ``struct statfs``; ``_rest`` covers the remainder."""

    _fields_ = [("f_type", _fsword_t), ("f_bsize", _fsword_t), ("_rest", ctypes.c_ubyte * 256)]


_libc.fstatfs.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_StatfsHead)]
_libc.statfs.restype = ctypes.c_int
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_StatfsHead)]

# mincore() only defines bit 0 of each vector byte ("resident"); this table keeps just that bit.
_RESIDENT_BIT = bytes(b & 1 for b in range(256))
_MINCORE_CHUNK = 1 << 30


def _errno_error(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call} failed: {os.strerror(err)}")


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int) -> int:
    result: int | None = _libc.mmap(addr, length, prot, flags, fd, 0)
    if result is None or result == _MAP_FAILED:
        raise _errno_error("mmap()")
    return result


def _munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        raise _errno_error("munmap()")


def _madvise(addr: int, length: int, advice: int, name: str) -> None:
    if _libc.madvise(addr, length, advice) != 0:
        raise _errno_error(f"madvise({name})")


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _errno_error("fallocate(PUNCH_HOLE|KEEP_SIZE)")


def _map_aligned(size: int, align: int, prot: int, flags: int, fd: int) -> int:
    """Map ``size`` bytes at an ``align``-aligned address and return that address.

    THP and huge pages can only back naturally aligned ranges, so (like QEMU's
    qemu_ram_mmap) reserve ``size + align`` of address space, map over its aligned part with
    MAP_FIXED and give back the slack on both sides.
    """
    total = size + align
    base = _mmap(
        None, total, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1
    )
    start = align_up(base, align)
    try:
        _mmap(start, size, prot, flags | _MAP_FIXED, fd)
    except OSError:
        _munmap(base, total)
        raise
    if start > base:
        _munmap(base, start - base)
    if base + total > start + size:
        _munmap(start + size, base + total - (start + size))
    return start


def _huge_page_size(buf: _StatfsHead) -> int | None:
    # Mask: on 32-bit ABIs the magic comes back sign-extended.
    if int(buf.f_type) & 0xFFFFFFFF == _HUGETLBFS_MAGIC:
        return int(buf.f_bsize)  # hugetlbfs reports its huge page size as block size
    return None


def _fd_page_size(fd: int) -> int:
    """RAM page size of memory mapped from ``fd``: the huge page size on hugetlbfs."""
    buf = _StatfsHead()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        raise _errno_error("fstatfs()")
    return _huge_page_size(buf) or host_page_size()


def hugetlbfs_page_size(path: str | os.PathLike[str]) -> int | None:
    """Huge page size of the hugetlbfs that ``path`` lives on; None if it is not hugetlbfs.

    A path that does not exist (yet) is not on hugetlbfs either; other statfs() failures
    raise :class:`HostMemoryError`.
    """
    buf = _StatfsHead()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        exc = _errno_error("statfs()")
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise HostMemoryError(f"cannot examine '{os.fspath(path)}': {exc}") from exc
    return _huge_page_size(buf)


def host_page_size() -> int:
    """The host's base page size in bytes (4 KiB on x86_64)."""
    return mmap.PAGESIZE


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
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        if fd is None:
            flags |= mmap.MAP_ANONYMOUS
        if not reserve:
            flags |= _MAP_NORESERVE
        try:
            self._addr = _map_aligned(
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
        if page_size == host_page_size():
            # Like QEMU, ask for THP on all guest RAM (in THP "madvise" mode nothing else
            # would) and ignore failure: without THP the memory is slower, not broken.
            _libc.madvise(self._addr, size, mmap.MADV_HUGEPAGE)

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
                _madvise(addr, length, mmap.MADV_REMOVE, "MADV_REMOVE")
            elif not self.shared:
                _madvise(addr, length, mmap.MADV_DONTNEED, "MADV_DONTNEED")
            if self._fd is not None and (self.shared or self._exclusive_fd):
                _punch_hole(self._fd, self.fd_offset + offset, length)
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
            _madvise(addr, length, _MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")
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
        return ctypes.string_at(self._range_addr("read", offset, length), length)

    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` into the backend at ``offset``."""
        ctypes.memmove(self._range_addr("write", offset, len(data)), data, len(data))
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
            if _libc.mincore(chunk_addr, chunk_len, vec) != 0:
                exc = _errno_error("mincore()")
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
            _munmap(self._addr, self.size)
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
            page_size = _fd_page_size(fd)
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
            page_size = _fd_page_size(fd)
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


_HPAGE_DIR = os.path.join("kernel", "mm", "transparent_hugepage")
# strtoull(base 0) syntax: optional whitespace and sign, then hex, octal or decimal digits.
_STRTOULL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _parse_u64(content: bytes) -> int | None:
    """Parse like QEMU's qemu_strtou64(base 0) plus "optionally followed by a newline"."""
    m = _STRTOULL.match(content)
    if m is None or content[m.end() :] not in (b"", b"\n"):
        return None
    sign, digits = m.groups()
    if digits[:2] in (b"0x", b"0X"):
        value = int(digits[2:], 16)
    elif digits.startswith(b"0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if value > U64_MAX:
        return None  # ERANGE
    # strtoull negates a leading minus sign modulo 2^64.
    return (-value) & U64_MAX if sign == b"-" else value


def _default_thp_size(machine: str, page_size: int) -> int:
    """QEMU's per-host-architecture guess when the THP size can't be read."""
    if machine in ("x86_64", "amd64", "ppc64", "ppc64le") or (
        machine.startswith("arm") and machine != "arm64"
    ):
        return 2 * MiB
    if machine in ("aarch64", "arm64"):
        return {4 * KiB: 2 * MiB, 16 * KiB: 32 * MiB, 64 * KiB: 512 * MiB}.get(page_size, MiB)
    return MiB  # s390x and everything else


def probe_thp_size(
    sysfs_root: str = "/sys", *, machine: str | None = None, page_size: int | None = None
) -> int:
    """Probe the THP size exactly like QEMU's virtio-mem does, without caching.

    No ``transparent_hugepage`` directory means no THP: 1 MiB, silently. Otherwise
    ``hpage_pmd_size`` is used if it holds a power of two; 0 or a non-power-of-two logs
    "Read unsupported THP size: %x", and any failure falls back to a guess for ``machine``
    (default: the host's) and ``page_size`` (default: the host's) with the warning
    "Could not detect THP size, falling back to %x  MiB." on logger ``memslots.host.memory``.
    """
    thp_dir = os.path.join(sysfs_root, _HPAGE_DIR)
    if not os.path.exists(thp_dir):
        return _MIN_BLOCK_SIZE
    try:
        with open(os.path.join(thp_dir, "hpage_pmd_size"), "rb") as f:
            value = _parse_u64(f.read())
    except OSError:
        value = None
    if value is not None:
        if not is_power_of_two(value):
            logger.warning("Read unsupported THP size: %x", value)
        # QEMU keeps the size in a uint32_t: a larger power of two truncates to 0 (undetected).
        elif value <= 0xFFFFFFFF:
            return value
    fallback = _default_thp_size(
        _MACHINE if machine is None else machine,
        host_page_size() if page_size is None else page_size,
    )
    logger.warning("Could not detect THP size, falling back to %x  MiB.", fallback // MiB)
    return fallback


_thp_sizes: dict[str, int] = {}


def thp_size(sysfs_root: str = "/sys") -> int:
    """The host's THP size, probed with :func:`probe_thp_size` once per ``sysfs_root``."""
    if sysfs_root not in _thp_sizes:
        _thp_sizes[sysfs_root] = probe_thp_size(sysfs_root)
    return _thp_sizes[sysfs_root]


class PageSized(Protocol):
    """Anything with a backing page size (host memory, or memory described for planning)."""

    @property
    def page_size(self) -> int:
        """The backing page size in bytes."""
        ...


def default_block_size(backend: PageSized) -> int:
    """virtio-mem's default block size for ``backend`` (QEMU's virtio_mem_default_block_size).

    Base-page backends (anonymous, memfd, shmem, ordinary files) get ``max(page, THP size)``;
    huge page backends get ``max(page, 1 MiB)``.
    """
    if backend.page_size == host_page_size():
        return max(backend.page_size, thp_size())
    return max(backend.page_size, _MIN_BLOCK_SIZE)
