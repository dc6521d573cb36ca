"""The monitor's options: ``-qmp`` for ``memslots run``, and for the client commands the QMP
address and the command arguments."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from memslots.errors import OptionError
from memslots.options.grammar import split_option_string
from memslots.sizes import shorten


@dataclass(frozen=True)
class QmpEndpoint:
    """Where the monitor listens: a Unix socket path, or (only if asked) a TCP address."""

    path: str | None = None
    host: str | None = None
    port: int | None = None


def parse_qmp_option(text: str) -> QmpEndpoint:
    """QEMU's ``-qmp unix:PATH,server=on,wait=off`` or ``-qmp tcp:HOST:PORT,server=on,...``."""
    pairs = split_option_string(text, "address")
    values = dict(pairs)
    address = values.pop("address", "")
    if values.pop("server", "on") not in ("on", "yes", "true"):
        raise OptionError(f"-qmp {text}: only server=on is supported")
    if values.pop("wait", "off") not in ("off", "no", "false"):
        raise OptionError(f"-qmp {text}: only wait=off is supported")
    if values:
        raise OptionError(f"-qmp {text}: unknown parameter '{next(iter(values))}'")
    if address.startswith("unix:") and len(address) > 5:
        return QmpEndpoint(path=address[5:])
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        number = _port(port)
        if not host or number is None:
            raise OptionError(f"-qmp {text}: expected tcp:HOST:PORT with a port up to 65535")
        return QmpEndpoint(host=_host(host, f"-qmp {text}"), port=number)
    raise OptionError(f"-qmp {text}: expected unix:PATH or tcp:HOST:PORT")


# -- the client side -----------------------------------------------------------------------------

#: Where a client connects: a Unix socket path, or (host, port).
Address = str | tuple[str, int]
_TCP = re.compile(r"(?:tcp:)?(?P<host>\[[^\]]+\]|[^/:\[\]]+):(?P<port>[0-9]+)")


def _host(host: str, where: str) -> str:
    """A host name or address that the resolver can take (IDNA-encodable)."""
    try:
        host.encode("idna")
    except UnicodeError:
        raise OptionError(f"{where}: '{shorten(host)}' is not a host name or address") from None
    return host


def _port(text: str) -> int | None:
    """A TCP port in ASCII decimal, 0-65535; None otherwise."""
    if not 0 < len(text) <= 5 or not text.isascii() or not text.isdigit():
        return None
    port = int(text)
    return port if port <= 65535 else None


def parse_address(text: str) -> Address:
    """A QMP address: ``HOST:PORT`` or ``tcp:HOST:PORT`` is TCP, anything else a socket path."""
    if text.startswith("unix:"):
        return text.removeprefix("unix:")
    match = _TCP.fullmatch(text)
    if match is None:
        return text
    port = _port(match["port"])
    if port is None:
        raise OptionError(f"'{shorten(text)}': the port must be 0-65535")
    return _host(match["host"].strip("[]"), f"'{shorten(text)}'"), port


def parse_arguments(items: Sequence[str]) -> dict[str, object]:
    """Command arguments from ``key=value`` words (values are JSON if they parse, else strings)
    or from one JSON object.
    """
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            obj: dict[str, object] = json.loads(items[0])  # starts with "{": an object or invalid
        except ValueError as exc:
            raise OptionError(f"arguments '{shorten(items[0])}': not valid JSON: {exc}") from None
        except RecursionError:
            raise OptionError(f"arguments '{shorten(items[0])}': nested too deeply") from None
        return obj
    args: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise OptionError(f"argument '{item}' is not of the form key=value")
        if key in args:
            raise OptionError(f"argument '{key}' given twice")
        try:
            args[key] = json.loads(raw, parse_constant=_not_json)
        except ValueError:
            args[key] = raw
        except RecursionError:
            raise OptionError(f"argument '{key}': nested too deeply") from None
    return args


def _not_json(name: str) -> object:
    raise ValueError(name)
