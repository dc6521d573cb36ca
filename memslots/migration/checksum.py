"""Record checksums of the migration stream: CRC-32 (always available) or XXH3-64 (faster).

A record's checksum covers its parts in order (see ``docs/migration.md``). Both algorithms
chain: CRC-32 continues from the previous value (``zlib.crc32(part, value)``, the same as one
CRC over the concatenation); XXH3-64 hashes each part with the previous value as its seed,
starting from 0. XXH3 comes from the system's ``libxxhash.so.0`` through ctypes, when it is
there: it runs at memory bandwidth, where CRC-32 (zlib's, ~2.3 GB/s here) would take more CPU
than the socket copy itself. A stream names its algorithm in its header; a reader without
libxxhash refuses an XXH3 stream with a clear message.
"""

from __future__ import annotations

import ctypes
import enum
import zlib
from collections.abc import Callable
from functools import cache

from memslots.errors import MigrationError

Buffer = bytes | bytearray | memoryview


class ChecksumKind(enum.IntEnum):
    """The checksum algorithm of a stream (its number in the stream header)."""

    CRC32 = 1
    XXH3_64 = 2

    @property
    def label(self) -> str:
        """The name used in options and messages (``crc32``, ``xxh3-64``)."""
        return {ChecksumKind.CRC32: "crc32", ChecksumKind.XXH3_64: "xxh3-64"}[self]


_Xxh3 = Callable[[object, int, int], int]


@cache
def _xxh3() -> _Xxh3 | None:
    try:
        lib = ctypes.CDLL("libxxhash.so.0")
        plain = lib.XXH3_64bits_withSeed
    except (OSError, AttributeError):
        return None
    fns = [plain]
    # The runtime-dispatched variant (AVX2/AVX-512 where the CPU has them) computes the same
    # hash about twice as fast here; take it if it is there and agrees.
    dispatch = getattr(lib, "XXH3_64bits_withSeed_dispatch", None)
    if dispatch is not None:
        fns.insert(0, dispatch)
    for fn in fns:
        fn.restype = ctypes.c_uint64
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64]
    probe = bytes(range(256)) * 5
    if len({fn(probe, n, 7) for fn in fns for n in (0, 3, 17, 129, 241, 1280)}) != 6:
        fns = [plain]
    xxh3: _Xxh3 = fns[0]
    return xxh3


def xxh3_available() -> bool:
    """Whether ``libxxhash.so.0`` (with XXH3) can be loaded here."""
    return _xxh3() is not None


def choose(name: str = "auto") -> ChecksumKind:
    """The algorithm for ``name``: ``crc32``, ``xxh3-64``, or ``auto`` (XXH3 when available)."""
    if name == "auto":
        return ChecksumKind.XXH3_64 if xxh3_available() else ChecksumKind.CRC32
    for kind in ChecksumKind:
        if kind.label == name:
            if kind is ChecksumKind.XXH3_64 and not xxh3_available():
                raise MigrationError("checksum xxh3-64 needs libxxhash.so.0, which is not here")
            return kind
    raise MigrationError(f"unknown checksum '{name}' (crc32, xxh3-64 or auto)")


class Hasher:
    """Computes one stream's record checksums with its algorithm (see the module docstring).

    :meth:`buf` takes any buffer; :meth:`mem` takes memory at a known address (host memory of
    guest RAM) together with a view of it, so XXH3 reads it in place without a buffer export.
    """

    def __init__(self, kind: ChecksumKind) -> None:
        self.kind = kind
        fn = _xxh3() if kind is ChecksumKind.XXH3_64 else None
        if kind is ChecksumKind.XXH3_64 and fn is None:
            raise MigrationError(
                "the stream uses xxh3-64 checksums, but libxxhash.so.0 is not available here"
            )
        self._xxh3 = fn

    def buf(self, value: int, data: Buffer) -> int:
        """Continue ``value`` over ``data``."""
        if self._xxh3 is None:
            return zlib.crc32(data, value)
        if isinstance(data, bytes):
            return int(self._xxh3(data, len(data), value))
        view = memoryview(data)
        if view.readonly:
            return int(self._xxh3(bytes(view), view.nbytes, value))
        if not view.nbytes:
            return int(self._xxh3(None, 0, value))
        holder = (ctypes.c_char * view.nbytes).from_buffer(view)
        try:
            return int(self._xxh3(ctypes.addressof(holder), view.nbytes, value))
        finally:
            del holder

    def mem(self, value: int, addr: int, view: memoryview) -> int:
        """Continue ``value`` over the ``view.nbytes`` bytes of memory at ``addr`` (``view`` is
        the same memory, for CRC-32)."""
        if self._xxh3 is None:
            return zlib.crc32(view, value)
        return int(self._xxh3(addr, view.nbytes, value))
