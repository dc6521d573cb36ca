"""Sizes the way QEMU writes them: binary units, suffixes B/K/M/G/T/P/E, fractions allowed.

``parse_size`` follows ``qemu_strtosz``: ``512M``, ``4G``, ``1.5G``, ``0x1000`` and plain bytes.
``parse_ram_size`` adds ``-m``'s legacy rule that a number without a suffix means MiB.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from memslots.errors import SizeError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PiB = 1 << 50
EiB = 1 << 60

U64_MAX = (1 << 64) - 1

_SUFFIXES = {"B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": PiB, "E": EiB}
# ASCII digits only: Python's \d, int() and str.isdigit also take "٤" (Arabic-Indic four);
# QEMU does not.
_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?([BKMGTPE]?)", re.IGNORECASE | re.ASCII)
# Hexadecimal with a suffix was removed in QEMU 8.0: "0x100000M" is an error.
_HEX = re.compile(r"0x([0-9a-f]+)", re.IGNORECASE | re.ASCII)
#: More significant digits than any value below 2^64 has, in decimal (20) or hex (16).
_MAX_DIGITS = 20
#: Fraction digits that matter: n / 2^60 has at most 60 decimal places, so cutting after 64
#: never changes the whole bytes (and keeps int() clear of Python's 4300-digit limit).
_MAX_FRACTION_DIGITS = 64
#: The whitespace C's isspace() skips before a number (strtoull): ASCII only.
_C_SPACE = " \t\n\v\f\r"


def parse_size(text: str, *, default_unit: int = 1, what: str = "size") -> int:
    """Parse a QEMU size string into bytes.

    ``default_unit`` is the multiplier for a number without suffix (1 = bytes). A fraction
    needs a suffix (or a default unit above bytes); the result is truncated to whole bytes.
    Raises :class:`SizeError` naming ``what`` on malformed input or values beyond 2^64-1.
    """
    s = text.strip(_C_SPACE)
    hexm = _HEX.fullmatch(s)
    if hexm:
        return _check_range(_to_int(hexm.group(1), 16, text, what), text, what)
    m = _DECIMAL.fullmatch(s)
    if not m:
        raise SizeError(
            f"invalid {what} '{shorten(text)}': expected a number with an optional suffix "
            "B, K, M, G, T, P or E (binary units), e.g. 512M or 4G"
        )
    whole, frac, suffix = m.group(1), m.group(2), m.group(3).upper()
    unit = _SUFFIXES[suffix] if suffix else default_unit
    if frac is not None and unit == 1:
        raise SizeError(f"invalid {what} '{shorten(text)}': a fractional size needs a unit suffix")
    value = _to_int(whole, 10, text, what) * unit
    if frac:
        frac = frac[:_MAX_FRACTION_DIGITS]
        value += int(frac) * unit // (10 ** len(frac))
    return _check_range(value, text, what)


def _to_int(digits: str, base: int, text: str, what: str) -> int:
    """``int(digits, base)`` for ASCII digits, refusing more digits than 2^64 has."""
    significant = digits.lstrip("0")
    if len(significant) > _MAX_DIGITS:
        raise _too_large(text, what)
    return int(significant or "0", base)


def shorten(text: str, limit: int = 40) -> str:
    """``text`` for a message: whole up to ``limit`` characters, else its ends and its length."""
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}...{text[-8:]} ({len(text)} characters)"


def parse_ram_size(text: str) -> int:
    """Parse ``-m``'s size: like :func:`parse_size` but a bare number means MiB (QEMU's rule).

    QEMU appends "M" to a size that ends in a digit, so a hexadecimal size ending in a digit
    becomes hex with a suffix, which it refuses.
    """
    s = text.strip(_C_SPACE)
    if _HEX.fullmatch(s) and s[-1] in "0123456789":
        raise SizeError(
            f"invalid memory size '{shorten(text)}': hexadecimal sizes take no unit (MiB)"
        )
    return parse_size(text, default_unit=MiB, what="memory size")


def _check_range(value: int, text: str, what: str) -> int:
    if value > U64_MAX:
        raise _too_large(text, what)
    return value


def _too_large(text: str, what: str) -> SizeError:
    return SizeError(f"invalid {what} '{shorten(text)}': value too large (above 2^64-1 bytes)")


_UNITS = (("EiB", EiB), ("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB))


def format_size(n: int) -> str:
    """Format bytes for humans: exact where that stays short ("2846 MiB"), else two decimals."""
    if n < 0:
        return "-" + format_size(-n)
    for i, (name, unit) in enumerate(_UNITS):
        if n >= unit:
            if n % unit == 0:
                return f"{n // unit} {name}"
            if i + 1 < len(_UNITS):
                small_name, small = _UNITS[i + 1]
                if n % small == 0 and n // small < 10000:
                    return f"{n // small} {small_name}"
            return f"{n / unit:.2f} {name}"
    return f"{n} B"


def column_unit(values: Iterable[int | float]) -> tuple[str, int]:
    """One unit for a column of sizes: the largest in which the smallest non-zero value is at
    least a quarter (1 TiB and 512 MiB: GiB, as 1024 and 0.5; never 0.0001), bytes for a
    column of zeros. Returns its name and size."""
    nonzero = [abs(v) for v in values if v]
    low = min(nonzero, default=0)
    return next(((name, unit) for name, unit in _UNITS if 4 * low >= unit), ("B", 1))


def format_in(n: int | float, unit: int) -> str:
    """``n`` bytes in ``unit``, for a table column: whole when exact, else two decimals at
    most (``1024``, ``1.5``, ``60.28``)."""
    value = n / unit
    if value == int(value):
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def hex_size(n: int, *, parens: bool = False) -> str:
    """A size in a refusal: QEMU's hex text first (so it still matches), then human units:
    ``0xf00000000 (60 GiB)``; with ``parens``, QEMU's ``(0x200000)`` stays whole:
    ``(0x200000) (2 MiB)``."""
    text = f"(0x{n:x})" if parens else f"0x{n:x}"
    return f"{text} ({format_size(n)})"


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (any positive alignment)."""
    return -(-value // alignment) * alignment


def align_down(value: int, alignment: int) -> int:
    """Round ``value`` down to a multiple of ``alignment``."""
    return value - value % alignment


def is_power_of_two(value: int) -> bool:
    """True for 1, 2, 4, ...; False for 0 and negatives."""
    return value > 0 and value & (value - 1) == 0
