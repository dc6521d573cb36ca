"""Migration URIs, as QEMU's ``migrate``/``migrate-incoming`` and ``-incoming`` take them.

``unix:PATH``, ``tcp:HOST:PORT`` (an IPv6 host in brackets) and ``file:PATH``; ``-incoming``
and ``migrate-incoming`` also take ``defer`` on the command line (QMP ``migrate-incoming``
then gives the URI). A destination may listen on TCP port 0 and report the port it got.
QEMU's ``exec:``, ``fd:``, ``rdma:`` and ``vsock:`` transports and ``file:``'s ``offset=`` are
not offered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from memslots.errors import OptionError

Transport = Literal["unix", "tcp", "file", "defer"]
_TCP = re.compile(r"^(?P<host>\[[^\]]+\]|[^:\[\]]+):(?P<port>\d+)$")
_UNSUPPORTED = ("exec:", "fd:", "rdma:", "vsock:")


@dataclass(frozen=True)
class MigrationUri:
    """Where a migration stream goes or comes from: ``transport`` and its address."""

    transport: Transport
    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.transport == "tcp":
            host = f"[{self.host}]" if self.host is not None and ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        if self.transport == "defer":
            return "defer"
        return f"{self.transport}:{self.path}"


def parse_migration_uri(text: str, *, incoming: bool = False, defer: bool = False) -> MigrationUri:
    """A migration URI (``incoming``: for a destination, which may listen on port 0;
    ``defer``: ``-incoming defer`` is allowed). Unknown transports get QEMU's message."""
    if defer and text == "defer":
        return MigrationUri("defer")
    for prefix in _UNSUPPORTED:
        if text.startswith(prefix):
            raise OptionError(
                f"{prefix[:-1]}: migration over {prefix[:-1]} is not supported "
                "(unix:PATH, tcp:HOST:PORT or file:PATH)"
            )
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise OptionError(f"migration URI '{text}': expected unix:PATH")
        return MigrationUri("unix", path=path)
    if text.startswith("tcp:"):
        match = _TCP.match(text.removeprefix("tcp:"))
        low = 0 if incoming else 1
        if match is None or not low <= int(match["port"]) <= 65535:
            raise OptionError(
                f"migration URI '{text}': expected tcp:HOST:PORT with a port from {low} to 65535"
            )
        return MigrationUri("tcp", host=match["host"].strip("[]"), port=int(match["port"]))
    if text.startswith("file:"):
        path = text.removeprefix("file:")
        if not path:
            raise OptionError(f"migration URI '{text}': expected file:PATH")
        if ",offset=" in path:
            raise OptionError(f"migration URI '{text}': file:'s offset= is not supported")
        return MigrationUri("file", path=path)
    raise OptionError(f"unknown migration protocol: {text}")
