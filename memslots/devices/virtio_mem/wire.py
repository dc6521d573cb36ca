"""virtio-mem on the wire: what Linux's ``include/uapi/linux/virtio_mem.h`` defines.

The device id, feature bits, request and response types, the 24-byte request, the 10-byte
response and the 56-byte config space, all little-endian (virtio spec, device ID 24). This is
the only part of the device that a guest driver sees, so the guest side imports nothing else.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

VIRTIO_ID_MEM = 24
#: ``nb_blocks`` is a le16: one request covers at most this many blocks.
MAX_NB_BLOCKS = 0xFFFF

REQUEST_SIZE = 24
RESPONSE_SIZE = 10
CONFIG_SIZE = 56

#: Feature bits.
F_ACPI_PXM = 0
F_UNPLUGGED_INACCESSIBLE = 1
F_PERSISTENT_SUSPEND = 2


class ReqType(enum.IntEnum):
    """Request types (le16 at offset 0 of a request)."""

    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


class Resp(enum.IntEnum):
    """Response types (le16 at offset 0 of a response)."""

    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


class BlockState(enum.IntEnum):
    """STATE request answers."""

    PLUGGED = 0
    UNPLUGGED = 1
    MIXED = 2


_REQ = struct.Struct("<H6xQH6x")
_RESP = struct.Struct("<H6xH")
_CONFIG = struct.Struct("<QH6xQQQQQ")


# Requests and responses are named tuples, not frozen dataclasses: one of each per request,
# and a tuple is built in a third of the time.


class Request(NamedTuple):
    """A guest request: 24 bytes, padding ignored."""

    type: int
    addr: int = 0
    nb_blocks: int = 0

    def pack(self) -> bytes:
        """The 24-byte wire form."""
        return _REQ.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> Request:
        """Parse the first 24 bytes of ``data`` (the caller checks the length)."""
        return cls._make(_REQ.unpack_from(data))


class Response(NamedTuple):
    """A device response: 10 bytes; ``state`` is meaningful for STATE only."""

    type: int
    state: int = 0

    def pack(self) -> bytes:
        """The 10-byte wire form."""
        return _RESP.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> Response:
        """Parse a 10-byte response."""
        return cls._make(_RESP.unpack_from(data))


@dataclass(frozen=True)
class Config:
    """The 56-byte device config space."""

    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int

    def pack(self) -> bytes:
        """The 56-byte little-endian layout."""
        return _CONFIG.pack(
            self.block_size,
            self.node_id,
            self.addr,
            self.region_size,
            self.usable_region_size,
            self.plugged_size,
            self.requested_size,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Config:
        """Parse the 56-byte layout."""
        return cls(*_CONFIG.unpack_from(data))
