"""KVM dirty logging: the ABI pieces, the bitmap helpers and the interface VM backends offer.

A memslot with ``KVM_MEM_LOG_DIRTY_PAGES`` gets a dirty bitmap in the kernel, one bit per 4 KiB
page (bit ``i`` of the little-endian 64-bit word ``w`` is page ``64 * w + i``, so byte ``j`` bit
``k`` is page ``8 * j + k``). ``KVM_GET_DIRTY_LOG`` copies ``ALIGN(npages, 64) / 8`` bytes of it
out; without manual protection it also clears it and write-protects the pages again. With
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` enabled (``KVM_ENABLE_CAP``), GET only reads and
``KVM_CLEAR_DIRTY_LOG`` clears and re-protects the pages of a mask; with
``KVM_DIRTY_LOG_INITIALLY_SET`` a new bitmap starts with every page set, and turning logging on
does not write-protect the whole slot up front. Facts: ``shared/reference/kvm.md`` A1,
``migration.md``.

Only the guest's own writes (through its page tables) are logged: writes the VMM makes into
guest memory through its host mapping are not, so the VMM tracks those itself
(:class:`memslots.migration.dirty.DirtyTracker`).

This module imports nothing from :mod:`memslots.kvm.abi`, which builds its ``VmBackend`` on
:class:`DirtyLogBackend` and sizes the dirty-log ioctls from the structs here.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from collections.abc import Iterator
from typing import Protocol

from memslots.errors import KvmError

#: Bits per page of a dirty bitmap: KVM logs 4 KiB pages on x86.
DIRTY_PAGE_SHIFT = 12
DIRTY_PAGE_SIZE = 1 << DIRTY_PAGE_SHIFT

#: KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) options (``args[0]``).
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# struct kvm_dirty_log: slot, padding1, dirty_bitmap (a user pointer).
DIRTY_LOG_STRUCT = struct.Struct("=IIQ")
# struct kvm_clear_dirty_log: slot, num_pages, first_page, dirty_bitmap (a user pointer).
CLEAR_DIRTY_LOG_STRUCT = struct.Struct("=IIQQ")

_NONZERO = re.compile(rb"[^\x00]+")
# Bytes of a bitmap decoded at a time: big enough to be cheap per run, small enough that the
# big-integer shifts stay fast (they are linear in the integer's size).
_PIECE = 4096


def bitmap_bytes(npages: int) -> int:
    """Bytes of a dirty bitmap for ``npages`` pages: ``ALIGN(npages, 64) / 8``."""
    if npages < 0:
        raise ValueError(f"negative page count {npages}")
    return (npages + 63) // 64 * 8


def bitmap_runs(
    bitmap: bytes | bytearray | memoryview, npages: int | None = None
) -> Iterator[tuple[int, int]]:
    """The runs of set bits of a dirty bitmap as ``(first page, pages)``, in order.

    Zero bytes are skipped at C speed (``re``), so a sparse bitmap of a huge slot costs little;
    bits at or beyond ``npages`` (when given) are ignored.
    """
    data = bytes(bitmap)
    limit = len(data) * 8 if npages is None else min(npages, len(data) * 8)
    run_start = -1
    run_end = -1
    for match in _NONZERO.finditer(data):
        for piece_start in range(match.start(), match.end(), _PIECE):
            piece = data[piece_start : min(match.end(), piece_start + _PIECE)]
            x = int.from_bytes(piece, "little")
            pos = piece_start * 8
            while x:
                zeros = (x & -x).bit_length() - 1
                x >>= zeros
                pos += zeros
                ones = (~x & (x + 1)).bit_length() - 1
                first, end = pos, min(pos + ones, limit)
                x >>= ones
                pos += ones
                if first >= limit:
                    break
                if first == run_end:
                    run_end = end
                else:
                    if run_start >= 0:
                        yield run_start, run_end - run_start
                    run_start, run_end = first, end
    if run_start >= 0:
        yield run_start, run_end - run_start


def bitmap_any(bitmap: bytes | bytearray | memoryview) -> bool:
    """Whether any bit is set (a C-speed scan for the first non-zero byte)."""
    return _NONZERO.search(bitmap) is not None


def bitmap_count(bitmap: bytes | bytearray | memoryview) -> int:
    """Number of set bits (dirty pages) in a bitmap."""
    return int.from_bytes(bytes(bitmap), "little").bit_count()


def full_bitmap(npages: int) -> bytearray:
    """A bitmap of ``bitmap_bytes(npages)`` bytes with exactly the first ``npages`` bits set."""
    out = bytearray(bitmap_bytes(npages))
    out[: npages // 8] = b"\xff" * (npages // 8)
    if npages % 8:
        out[npages // 8] = (1 << (npages % 8)) - 1
    return out


def dirty_log_error(what: str, slot: int, err: int, reason: str | None = None) -> KvmError:
    """The :class:`KvmError` of a failed GET/CLEAR_DIRTY_LOG: the slot, the errno and why."""
    as_id, slot_id = slot >> 16, slot & 0xFFFF
    why = reason or _DIRTY_LOG_HINTS.get(err) or os.strerror(err)
    return KvmError(
        f"{what} failed for memslot {slot} (as_id {as_id}, id {slot_id}): "
        f"{errno.errorcode.get(err, str(err))}: {why}",
        err,
    )


_DIRTY_LOG_HINTS = {
    errno.ENOENT: "the slot does not exist or has no dirty bitmap (logging is off)",
    errno.EINVAL: "bad slot id, address space or page range",
}


class DirtyLogBackend(Protocol):
    """Dirty logging as a VM offers it: the real :class:`~memslots.kvm.vm.KvmVm` or the model.

    Logging itself is switched per slot with the ``KVM_MEM_LOG_DIRTY_PAGES`` flag of
    ``set_memory_region`` (a FLAGS_ONLY change of an existing slot). Errors are
    :class:`~memslots.errors.KvmError` with the kernel's errno: ``ENOENT`` for a slot that does
    not exist or has no bitmap, ``EINVAL`` for a bad slot id or range.
    """

    def dirty_log_caps(self) -> int:
        """``KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)``: 0 if unsupported, else
        the mask of options ``enable_dirty_log_protect`` accepts (MANUAL_PROTECT_ENABLE,
        INITIALLY_SET)."""
        ...

    def enable_dirty_log_protect(self, initially_set: bool = False) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)``: GET_DIRTY_LOG only reads from
        now on, CLEAR_DIRTY_LOG re-protects; ``initially_set`` makes new bitmaps start full.
        QEMU does this once, before any memslot exists."""
        ...

    def get_dirty_log(self, slot: int, npages: int) -> bytearray:
        """``KVM_GET_DIRTY_LOG`` of ``slot`` (``as_id << 16 | id``), which has ``npages`` pages:
        ``bitmap_bytes(npages)`` bytes. Without manual protection the kernel's bitmap is
        cleared and the pages are write-protected again."""
        ...

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: bytes | bytearray
    ) -> None:
        """``KVM_CLEAR_DIRTY_LOG``: clear (and re-protect) the pages of ``bitmap`` in
        ``[first_page, first_page + num_pages)``; ``first_page`` is a multiple of 64 and so is
        ``num_pages`` unless the range ends at the slot's end."""
        ...
