"""The simplest in-order guest driver: deterministic request streams for measurements and demos.

It is not a model of Linux (that is :mod:`memslots.guest.linux`): it plugs the lowest unplugged
blocks first and unplugs the highest plugged blocks first, in requests of at most 65535
contiguous blocks, and hands each request straight to the device's request handler (no
virtqueue). Like a guest driver it knows only virtio-mem's wire format; it reads which blocks
are plugged from the device's bitmap instead of keeping its own.
"""

from __future__ import annotations

from typing import Protocol

from memslots.devices.virtio_mem.wire import MAX_NB_BLOCKS, ReqType, Request, Resp, Response
from memslots.errors import DeviceError


class RequestTarget(Protocol):
    """What the in-order driver needs from a virtio-mem device."""

    @property
    def label(self) -> str:
        """The device's id for messages."""
        ...

    @property
    def addr(self) -> int:
        """The device's guest-physical address."""
        ...

    @property
    def block_size(self) -> int:
        """The block size."""
        ...

    @property
    def size(self) -> int:
        """Bytes plugged now."""
        ...

    @property
    def bitmap(self) -> bytearray:
        """One byte per block: 1 if plugged."""
        ...

    def set_requested_size(self, value: int) -> None:
        """Set ``requested-size``."""
        ...

    def handle_request(self, data: bytes) -> bytes:
        """Process one request in wire format; return the response in wire format."""
        ...


def drive_to(dev: RequestTarget, target: int) -> int:
    """Set ``requested-size`` to ``target`` and get there through the request path.

    Returns the number of requests sent; raises :class:`DeviceError` unless every one is ACKed.
    """
    dev.set_requested_size(target)
    bs = dev.block_size
    sent = 0
    while dev.size != target:
        plug = dev.size < target
        want = (target - dev.size) // bs if plug else (dev.size - target) // bs
        if plug:
            first = dev.bitmap.find(0)
            end = dev.bitmap.find(1, first)
            end = len(dev.bitmap) if end < 0 else end
            count = min(want, end - first, MAX_NB_BLOCKS)
        else:
            last = dev.bitmap.rfind(1)
            start = dev.bitmap.rfind(0, 0, last) + 1
            count = min(want, last + 1 - start, MAX_NB_BLOCKS)
            first = last + 1 - count
        kind = ReqType.PLUG if plug else ReqType.UNPLUG
        resp = Response.unpack(
            dev.handle_request(Request(kind, dev.addr + first * bs, count).pack())
        )
        sent += 1
        if resp.type != Resp.ACK:
            raise DeviceError(
                f"virtio-mem '{dev.label}' answered {Resp(resp.type).name} to {kind.name} of "
                f"{count} blocks at 0x{dev.addr + first * bs:x}"
            )
    return sent
