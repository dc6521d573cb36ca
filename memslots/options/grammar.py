"""QEMU's option grammar: ``key=value`` lists as QemuOpts splits them, and the typed values in them.

:class:`Props` consumes the pairs of one option key by key, so that every rule can name the
option, the key and what is allowed, and so that leftovers are reported. QMP arguments (JSON
numbers, booleans, strings) become the same pairs, so both follow the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from memslots.errors import OptionError, SizeError
from memslots.sizes import U64_MAX, parse_size, shorten

_BOOL_WORDS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


# C's strtoll/strtoull with base 0, as QEMU's integer properties parse: a sign, then 0x hex,
# 0 octal or decimal, in ASCII digits (Python's int() also takes "٤" and "1_0").
_INTEGER = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
#: Digits beyond which no value fits in 64 bits, in any of those bases (octal: 22).
_MAX_INTEGER_DIGITS = 24
#: What :func:`qemu_integer` gives for more digits than that: out of every range.
TOO_LARGE = 1 << 64


def qemu_integer(text: str) -> int | None:
    """An integer as QEMU reads one (decimal, 0x hex, 0 octal, optional sign), or None if the
    text is none. More digits than 64 bits can hold give +-:data:`TOO_LARGE`."""
    m = _INTEGER.fullmatch(text)
    if m is None:
        return None
    sign, digits = m.groups()
    if len(digits) > _MAX_INTEGER_DIGITS:
        value = TOO_LARGE
    elif digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits[0] == "0" and len(digits) > 1:
        value = int(digits[1:], 8)  # a leading 0, as C reads it
    else:
        value = int(digits)
    return -value if sign == "-" else value


_DECIMAL_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_DECIMAL_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def decimal_integer(text: str) -> int:
    """A command-line flag's integer: ASCII decimal with an optional sign (``int()`` also takes
    "٤" and "1_0"). Raises ValueError for anything else; more digits than 64 bits hold give
    +-:data:`TOO_LARGE`, for the flag's range to refuse."""
    if not _DECIMAL_INTEGER.fullmatch(text):
        raise ValueError(text)
    digits = text.lstrip("+-").lstrip("0")
    value = TOO_LARGE if len(digits) > _MAX_INTEGER_DIGITS else int(digits or "0")
    return -value if text.startswith("-") else value


def decimal_number(text: str) -> float:
    """A command-line flag's number: finite, ASCII decimal (``float()`` also takes "nan",
    "inf" and "٤"). Raises ValueError for anything else."""
    if not _DECIMAL_NUMBER.fullmatch(text):
        raise ValueError(text)
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(text)
    return value


def split_option_string(text: str, implied_key: str | None) -> list[tuple[str, str]]:
    """Split ``a,b=c,d=e`` into key/value pairs the way QEMU's QemuOpts does.

    A first element without ``=`` is the value of ``implied_key``; ``,,`` is an escaped comma.
    """
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    pairs: list[tuple[str, str]] = []
    for index, part in enumerate(parts):
        if part == "":
            raise OptionError(f"'{text}': empty element in option list")
        if "=" in part:
            key, value = part.split("=", 1)
            if not key:
                raise OptionError(f"'{text}': element '{part}' has an empty key")
            pairs.append((key, value))
        elif index == 0 and implied_key is not None:
            pairs.append((implied_key, part))
        else:
            raise OptionError(f"'{text}': element '{part}' is not of the form key=value")
    return pairs


def id_wellformed(text: str) -> bool:
    """QEMU's ``id_wellformed``: a letter, then letters, digits, '-', '.' or '_'."""
    return (
        text[:1].isascii()
        and text[:1].isalpha()
        and all(c.isascii() and (c.isalnum() or c in "-._") for c in text)
    )


class Props:
    """Key/value pairs of one option, consumed key by key so that leftovers are reported."""

    def __init__(self, option: str, text: str, pairs: list[tuple[str, str]]) -> None:
        self.option = option
        self.text = text
        self.values: dict[str, str] = {}
        for key, value in pairs:
            if key in self.values:
                raise OptionError(f"{option} {text}: parameter '{key}' given twice")
            self.values[key] = value

    def where(self) -> str:
        return f"{self.option} {self.text}"

    def pop_str(self, key: str, default: str | None = None) -> str | None:
        return self.values.pop(key, default)

    def pop_id(self, *, required: bool = False) -> str | None:
        """The ``id`` parameter, which must be an identifier as QEMU requires."""
        value = self.require_str("id") if required else self.pop_str("id")
        if value is not None and not id_wellformed(value):
            raise OptionError(f"{self.where()}: Parameter 'id' expects an identifier")
        return value

    def require_str(self, key: str) -> str:
        value = self.values.pop(key, None)
        if value is None or value == "":
            raise OptionError(f"{self.where()}: parameter '{key}' is missing")
        return value

    def pop_size(self, key: str, default: int | None = None) -> int | None:
        raw = self.values.pop(key, None)
        if raw is None:
            return default
        try:
            return parse_size(raw, what=f"'{key}'")
        except SizeError as exc:
            raise OptionError(f"{self.where()}: {exc}") from exc

    def pop_u64(self, key: str, default: int) -> int:
        """A uint64 property as QEMU parses it: decimal, 0x hex or 0 octal; no suffixes."""
        raw = self.values.pop(key, None)
        if raw is None:
            return default
        value = qemu_integer(raw)
        if value is None or not 0 <= value <= U64_MAX:
            raise OptionError(
                f"{self.where()}: Parameter '{key}' expects uint64 (got '{shorten(raw)}')"
            )
        return value

    def pop_uint32(self, key: str, default: int) -> int:
        """A uint32 property (``node``): QEMU refuses what is no integer, then what is out of
        range, in these words."""
        return self._pop_ranged(key, default, 0, (1 << 32) - 1, "uint32_t")

    def pop_int32(self, key: str, default: int) -> int:
        """An int32 property (pc-dimm's ``slot``, where -1 means the first free one)."""
        return self._pop_ranged(key, default, -(1 << 31), (1 << 31) - 1, "int32_t")

    def _pop_ranged(self, key: str, default: int, low: int, high: int, c_type: str) -> int:
        raw = self.values.pop(key, None)
        if raw is None:
            return default
        value = qemu_integer(raw)
        if value is None or abs(value) > U64_MAX:
            raise OptionError(f"{self.where()}: Parameter '{key}' expects integer")
        if not low <= value <= high:
            raise OptionError(f"{self.where()}: Parameter '{key}' expects {c_type}")
        return value

    def pop_number(self, key: str, default: int) -> int:
        """A QemuOpts number (``-m slots=``): a uint64 where, as in C, -1 is 2^64-1."""
        raw = self.values.pop(key, None)
        if raw is None:
            return default
        value = qemu_integer(raw)
        if value is None:
            raise OptionError(f"{self.where()}: Parameter '{key}' expects a number")
        if not -U64_MAX <= value <= U64_MAX:
            raise OptionError(
                f"{self.where()}: Value '{shorten(raw)}' is too large for parameter '{key}'"
            )
        return value % (1 << 64)

    def pop_bool(self, key: str, default: bool) -> bool:
        raw = self.values.pop(key, None)
        if raw is None:
            return default
        try:
            return _BOOL_WORDS[raw.lower()]
        except KeyError:
            raise OptionError(
                f"{self.where()}: parameter '{key}' expects 'on' or 'off', got '{raw}'"
            ) from None

    def pop_choice(self, key: str, choices: Sequence[str], default: str) -> str:
        raw = self.values.pop(key, None)
        if raw is None:
            return default
        if raw not in choices:
            allowed = ", ".join(f"'{c}'" for c in choices)
            raise OptionError(f"{self.where()}: parameter '{key}' expects one of {allowed}")
        return raw

    def finish(self, allowed: Sequence[str]) -> None:
        if self.values:
            key = next(iter(self.values))
            raise OptionError(
                f"{self.where()}: unknown parameter '{key}' (allowed: {', '.join(allowed)})"
            )


def args_pairs(args: dict[str, object], where: str) -> list[tuple[str, str]]:
    pairs = []
    for key, value in args.items():
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, int | str):
            text = str(value)
        else:
            raise OptionError(f"{where}: parameter '{key}' expects a string, a number or a boolean")
        pairs.append((key, text))
    return pairs


def describe_args(args: dict[str, object]) -> str:
    for key in ("id", "qom-type", "driver"):
        if isinstance(args.get(key), str):
            return f"'{args[key]}'"
    return "(arguments)"
