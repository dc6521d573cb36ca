"""The libc calls behind host memory, through ctypes: mmap, munmap, mprotect, madvise, mincore,
fallocate, statfs, and memcmp/memset on raw addresses.

Python's :mod:`mmap` module hides the raw address that KVM_SET_USER_MEMORY_REGION and
vhost-user need and cannot map with ``MAP_NORESERVE``, so host memory is mapped with libc's own
``mmap``. Every failure is an :class:`OSError` carrying the call's errno.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform

from memslots.sizes import align_up

__all__ = [
    "HUGETLBFS_MAGIC",
    "MADV_POPULATE_WRITE",
    "MAP_NORESERVE",
    "PROT_NONE",
    "errno_error",
    "fstatfs",
    "madvise",
    "madvise_hint",
    "map_aligned",
    "memcmp",
    "memset",
    "mincore",
    "mmap_raw",
    "mprotect",
    "munmap",
    "punch_hole",
    "remap_fixed",
    "statfs",
]

MACHINE = platform.machine()

# Linux constants that Python 3.11's mmap/os modules do not export.
PROT_NONE = 0
_MAP_FIXED = 0x10
if MACHINE.startswith(("ppc", "powerpc", "sparc")):
    MAP_NORESERVE = 0x40
elif MACHINE.startswith("mips"):
    MAP_NORESERVE = 0x400
else:
    MAP_NORESERVE = 0x4000
MADV_POPULATE_WRITE = 23  # Linux 5.14
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
HUGETLBFS_MAGIC = 0x958458F6

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
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.memcmp.restype = ctypes.c_int
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memset.restype = ctypes.c_void_p
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, _off_t, _off_t]


# statfs's __fsword_t is a long everywhere except s390x, where glibc declares unsigned int.
_fsword_t = ctypes.c_uint if MACHINE == "s390x" else ctypes.c_long


class _StatfsHead(ctypes.Structure):
    """The two leading fields of ``struct statfs``; ``_rest`` covers the remainder."""

    _fields_ = [("f_type", _fsword_t), ("f_bsize", _fsword_t), ("_rest", ctypes.c_ubyte * 256)]


_libc.fstatfs.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_StatfsHead)]
_libc.statfs.restype = ctypes.c_int
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_StatfsHead)]


def errno_error(call: str) -> OSError:
    """An OSError for the errno the last libc call left."""
    err = ctypes.get_errno()
    return OSError(err, f"{call} failed: {os.strerror(err)}")


def mmap_raw(addr: int | None, length: int, prot: int, flags: int, fd: int) -> int:
    """libc ``mmap`` at offset 0; returns the address."""
    result: int | None = _libc.mmap(addr, length, prot, flags, fd, 0)
    if result is None or result == _MAP_FAILED:
        raise errno_error("mmap()")
    return result


def remap_fixed(addr: int, length: int, prot: int, flags: int, fd: int) -> None:
    """Map ``fd`` (from offset 0) over ``[addr, addr + length)`` in place (MAP_FIXED): the old
    mapping there is replaced atomically, with no moment in which the range is unmapped."""
    mmap_raw(addr, length, prot, flags | _MAP_FIXED, fd)


def munmap(addr: int, length: int) -> None:
    """libc ``munmap``."""
    if _libc.munmap(addr, length) != 0:
        raise errno_error("munmap()")


def mprotect(addr: int, length: int, prot: int) -> None:
    """libc ``mprotect`` (ENOMEM also when the change would split the mapping into more
    areas than ``vm.max_map_count`` allows)."""
    if _libc.mprotect(addr, length, prot) != 0:
        raise errno_error("mprotect()")


def madvise(addr: int, length: int, advice: int, name: str) -> None:
    """libc ``madvise``; ``name`` names the advice in the error."""
    if _libc.madvise(addr, length, advice) != 0:
        raise errno_error(f"madvise({name})")


def madvise_hint(addr: int, length: int, advice: int) -> None:
    """``madvise`` whose failure does not matter (a hint such as MADV_HUGEPAGE)."""
    _libc.madvise(addr, length, advice)


def mincore(addr: int, length: int, vec: ctypes.Array[ctypes.c_ubyte]) -> None:
    """libc ``mincore`` into ``vec`` (one byte per page)."""
    if _libc.mincore(addr, length, vec) != 0:
        raise errno_error("mincore()")


def memcmp(a: int, b: int, length: int) -> int:
    """libc's memcmp of ``length`` bytes at two raw addresses (0: equal)."""
    return int(_libc.memcmp(a, b, length))


def memset(addr: int, value: int, length: int) -> None:
    """libc's memset of ``length`` bytes at a raw address."""
    _libc.memset(addr, value, length)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """``fallocate(PUNCH_HOLE|KEEP_SIZE)``: free a file range without changing its size."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise errno_error("fallocate(PUNCH_HOLE|KEEP_SIZE)")


def map_aligned(size: int, align: int, prot: int, flags: int, fd: int) -> int:
    """Map ``size`` bytes at an ``align``-aligned address and return that address.

    THP and huge pages can only back naturally aligned ranges, so (like QEMU's
    qemu_ram_mmap) reserve ``size + align`` of address space, map over its aligned part with
    MAP_FIXED and give back the slack on both sides.
    """
    total = size + align
    base = mmap_raw(
        None, total, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1
    )
    start = align_up(base, align)
    try:
        mmap_raw(start, size, prot, flags | _MAP_FIXED, fd)
    except OSError:
        munmap(base, total)
        raise
    if start > base:
        munmap(base, start - base)
    if base + total > start + size:
        munmap(start + size, base + total - (start + size))
    return start


def _fs_type_and_block_size(buf: _StatfsHead) -> tuple[int, int]:
    # Mask: on 32-bit ABIs the magic comes back sign-extended.
    return int(buf.f_type) & 0xFFFFFFFF, int(buf.f_bsize)


def fstatfs(fd: int) -> tuple[int, int]:
    """``(f_type, f_bsize)`` of the file system ``fd`` lives on."""
    buf = _StatfsHead()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        raise errno_error("fstatfs()")
    return _fs_type_and_block_size(buf)


def statfs(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(f_type, f_bsize)`` of the file system ``path`` lives on."""
    buf = _StatfsHead()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        raise errno_error("statfs()")
    return _fs_type_and_block_size(buf)
