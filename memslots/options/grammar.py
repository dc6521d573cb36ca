"""QEMU's option grammar: ``key=value`` lists as QemuOpts splits them, and the typed values in them.

:class:`Props` consumes the pairs of one option key by key, so that every rule can name the
option, the key and what is allowed, and so that leftovers are reported. QMP arguments (JSON
numbers, booleans, strings) become the same pairs, so both follow the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence

from memslots.errors import OptionError, SizeError
from memslots.sizes import parse_size

_BOOL_WORDS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


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
        digits, base = raw, 10
        if raw[:2].lower() == "0x":
            digits, base = raw[2:], 16
        elif len(raw) > 1 and raw.startswith("0"):
            digits, base = raw[1:], 8
        try:
            if not digits or not digits.isalnum():
                raise ValueError(raw)
            value = int(digits, base)
        except ValueError:
            raise OptionError(
                f"{self.where()}: Parameter '{key}' expects uint64 (got '{raw}')"
            ) from None
        if value >= 1 << 64:
            raise OptionError(f"{self.where()}: Parameter '{key}' expects uint64 (got '{raw}')")
        return value

    def pop_int(self, key: str, default: int) -> int:
        raw = self.values.pop(key, None)
        if raw is None:
            return default
        try:
            value = int(raw, 0)
        except ValueError:
            raise OptionError(
                f"{self.where()}: parameter '{key}' expects a non-negative integer, got '{raw}'"
            ) from None
        if value < 0:
            raise OptionError(f"{self.where()}: parameter '{key}' must not be negative")
        return value

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
