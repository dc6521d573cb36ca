"""Payloads of the stream's sections: the machine configuration and the virtio-mem states.

* CONFIG (version 1): UTF-8 JSON (see :func:`memslots.migration.machine.describe_machine`).
* EARLY ``virtio-mem/<id>`` (version 1): ``u64 addr | u64 region_size | u64 block_size |
  u64 size | u64 blocks | u32 node | u32 0``, then the plugged bitmap packed one bit per block
  (``ceil(blocks / 8)`` bytes, block ``i`` is bit ``i % 8`` of byte ``i // 8``).
* LATE ``virtio-mem/<id>`` (version 1): ``u64 usable_region_size | u64 requested_size |
  u32 n``, then ``n`` bytes of virtio state (opaque).
* STATE ``<component>``: opaque bytes of the component, with its own version.

Decoders check lengths and reserved fields and raise :class:`MigrationError`.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from memslots.devices.virtio_mem.device import VirtioMemEarlyState, VirtioMemLateState
from memslots.errors import MigrationError

_EARLY = struct.Struct("<QQQQQII")
_LATE = struct.Struct("<QQI")
_TO_01 = bytes.maketrans(b"\x00\x01", b"01")
_FROM_01 = bytes.maketrans(b"01", b"\x00\x01")

EARLY_VERSION = 1
LATE_VERSION = 1
CONFIG_VERSION = 1


def pack_bits(bytemap: bytes) -> bytes:
    """One byte per entry (0 or 1) -> one bit per entry, least significant bit first."""
    n = len(bytemap)
    if not n:
        return b""
    # int() of a base-2 string is linear; the string is most significant digit first.
    value = int(bytemap.translate(_TO_01)[::-1], 2)
    return value.to_bytes((n + 7) // 8, "little")


def unpack_bits(packed: bytes, n: int) -> bytes:
    """The inverse of :func:`pack_bits` for ``n`` entries; bits beyond ``n`` must be clear."""
    if len(packed) != (n + 7) // 8:
        raise MigrationError(
            f"a bitmap of {n} entries needs {(n + 7) // 8} bytes, got {len(packed)}"
        )
    value = int.from_bytes(packed, "little")
    if value >> n:
        raise MigrationError(f"a bitmap of {n} entries has bits set beyond its end")
    if not n:
        return b""
    return format(value, f"0{n}b")[::-1].encode().translate(_FROM_01)


def encode_early(state: VirtioMemEarlyState) -> bytes:
    """The EARLY payload of a virtio-mem device."""
    blocks = len(state.bitmap)
    head = _EARLY.pack(
        state.addr, state.region_size, state.block_size, state.size, blocks, state.node, 0
    )
    return head + pack_bits(state.bitmap)


def decode_early(payload: bytes, name: str) -> VirtioMemEarlyState:
    """Parse an EARLY payload (raises :class:`MigrationError` naming the section)."""
    if len(payload) < _EARLY.size:
        raise MigrationError(f"section '{name}': early state of {len(payload)} bytes is too short")
    addr, region, block, size, blocks, node, reserved = _EARLY.unpack_from(payload)
    if reserved:
        raise MigrationError(f"section '{name}': reserved field is not zero")
    try:
        bitmap = unpack_bits(payload[_EARLY.size :], blocks)
    except MigrationError as exc:
        raise MigrationError(f"section '{name}': {exc}") from None
    return VirtioMemEarlyState(addr, region, block, node, size, bitmap)


def encode_late(state: VirtioMemLateState) -> bytes:
    """The LATE payload of a virtio-mem device."""
    virtio = state.virtio
    return _LATE.pack(state.usable_region_size, state.requested_size, len(virtio)) + virtio


def decode_late(payload: bytes, name: str) -> VirtioMemLateState:
    """Parse a LATE payload."""
    if len(payload) < _LATE.size:
        raise MigrationError(f"section '{name}': late state of {len(payload)} bytes is too short")
    usable, requested, n = _LATE.unpack_from(payload)
    if len(payload) != _LATE.size + n:
        raise MigrationError(
            f"section '{name}': late state says {n} bytes of virtio state, has "
            f"{len(payload) - _LATE.size}"
        )
    return VirtioMemLateState(usable, requested, payload[_LATE.size :])


def encode_config(config: dict[str, Any]) -> bytes:
    """The CONFIG payload: canonical JSON."""
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def decode_config(payload: bytes) -> dict[str, Any]:
    """Parse the CONFIG payload."""
    try:
        config = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MigrationError(f"the CONFIG section is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise MigrationError("the CONFIG section is not a JSON object")
    return config
