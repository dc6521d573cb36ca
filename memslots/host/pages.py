"""Page sizes of the host: the base page, hugetlbfs huge pages, and the transparent huge page
(THP) size as QEMU probes it (``virtio_mem_thp_size``).

The probes here are run once, by :func:`memslots.kvm.host.detect_host`; what they found reaches
memory backends and virtio-mem as a :class:`HostPages` (or as plain sizes), never by probing
again."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
from dataclasses import dataclass

from memslots.errors import HostMemoryError
from memslots.host import libc
from memslots.sizes import U64_MAX, KiB, MiB, is_power_of_two

__all__ = [
    "NO_THP_SIZE",
    "HostPages",
    "fd_page_size",
    "host_page_size",
    "hugetlbfs_page_size",
    "probe_thp_size",
    "read_default_huge_page_size",
]

logger = logging.getLogger("memslots.host.pages")

#: QEMU's THP size when the host has no THP at all.
NO_THP_SIZE = MiB


@dataclass(frozen=True)
class HostPages:
    """The page sizes of a host (detected, or described for planning): the base page, the THP
    size (QEMU's probe, which decides virtio-mem's default block size and how guest RAM is
    aligned) and the default hugetlb page size (a ``hugetlb=on`` memfd without
    ``hugetlbsize``)."""

    page_size: int
    thp_size: int
    huge_page_size: int


def host_page_size() -> int:
    """The host's base page size in bytes (4 KiB on x86_64)."""
    return mmap.PAGESIZE


def _huge_page_size(fs_type: int, block_size: int) -> int | None:
    if fs_type == libc.HUGETLBFS_MAGIC:
        return block_size  # hugetlbfs reports its huge page size as block size
    return None


def fd_page_size(fd: int) -> int:
    """RAM page size of memory mapped from ``fd``: the huge page size on hugetlbfs."""
    return _huge_page_size(*libc.fstatfs(fd)) or host_page_size()


def hugetlbfs_page_size(path: str | os.PathLike[str]) -> int | None:
    """Huge page size of the hugetlbfs that ``path`` lives on; None if it is not hugetlbfs.

    A path that does not exist (yet) is not on hugetlbfs either; other statfs() failures
    raise :class:`HostMemoryError`.
    """
    try:
        return _huge_page_size(*libc.statfs(path))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise HostMemoryError(f"cannot examine '{os.fspath(path)}': {exc}") from exc


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

    No ``transparent_hugepage`` directory means no THP: 1 MiB, silently (QEMU 9.2's rule; 8.2
    warns and falls back to the guess below, see README "Target"). Otherwise
    ``hpage_pmd_size`` is used if it holds a power of two; 0 or a non-power-of-two logs
    "Read unsupported THP size: %x", and any failure falls back to a guess for ``machine``
    (default: the host's) and ``page_size`` (default: the host's) with the warning
    "Could not detect THP size, falling back to %x  MiB." on logger ``memslots.host.pages``.
    """
    thp_dir = os.path.join(sysfs_root, _HPAGE_DIR)
    if not os.path.exists(thp_dir):
        return NO_THP_SIZE
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
        libc.MACHINE if machine is None else machine,
        host_page_size() if page_size is None else page_size,
    )
    logger.warning("Could not detect THP size, falling back to %x  MiB.", fallback // MiB)
    return fallback


def read_default_huge_page_size(meminfo: str = "/proc/meminfo") -> int | None:
    """The default hugetlb page size (``Hugepagesize`` of ``meminfo``); None if unreadable."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return None
