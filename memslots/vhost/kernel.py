"""vhost-kernel: the limit QEMU reads from the vhost module (read once, by the host detection),
``/dev/vhost-net``, a model of its memory table rules for hosts without it, and the memslot
consumer over either.

:class:`VhostKernelConsumer` is QEMU's ``-netdev tap,vhost=on`` back-end as far as memory is
concerned: every RAM section costs a region, and the whole table is set at the end of each
batch (VHOST_SET_MEM_TABLE). :class:`VhostKernelModel` enforces the kernel's
``max_mem_regions`` with the kernel's errno.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from memslots.errors import VhostError
from memslots.host.vhost import VHOST_NET_PATH
from memslots.memory.address_space import Section
from memslots.vhost.backend import VhostBackend

# <linux/vhost.h>: VHOST_VIRTIO = 0xAF; _IO(0xAF, 0x01) and _IOW(0xAF, 0x03, struct vhost_memory),
# where sizeof(struct vhost_memory) is 8 (nregions, padding, then a flexible array).
VHOST_SET_OWNER = 0xAF01
VHOST_SET_MEM_TABLE = 0x4008AF03
_VHOST_MEMORY = struct.Struct("<II")
_VHOST_MEMORY_REGION = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class KernelRegion:
    """One entry of a vhost-kernel memory table."""

    gpa: int
    size: int
    uaddr: int


def pack_vhost_memory(regions: Sequence[KernelRegion]) -> bytearray:
    """``struct vhost_memory`` with its regions, as VHOST_SET_MEM_TABLE takes it.

    A bytearray, because ``fcntl.ioctl`` only passes a mutable buffer through without the
    1024-byte copy limit.
    """
    buf = bytearray(_VHOST_MEMORY.pack(len(regions), 0))
    for r in regions:
        buf += _VHOST_MEMORY_REGION.pack(r.gpa, r.size, r.uaddr, 0)
    return buf


class VhostKernelDevice(Protocol):
    """What :class:`VhostKernelConsumer` needs from a vhost-kernel device: its memory table."""

    @property
    def is_real(self) -> bool:
        """True for a real ``/dev/vhost-*`` device."""
        ...

    def set_mem_table(self, regions: Sequence[KernelRegion]) -> None:
        """Replace the whole memory table; raise :class:`VhostError` (table unchanged) if not."""
        ...

    def close(self) -> None:
        """Release the device."""
        ...


class VhostNet:
    """The real ``/dev/vhost-net``: opened, owned (VHOST_SET_OWNER), given memory tables."""

    is_real = True

    def __init__(self, path: str = VHOST_NET_PATH) -> None:
        try:
            self.fd: int | None = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise VhostError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            fcntl.ioctl(self.fd, VHOST_SET_OWNER, 0)
        except OSError as exc:
            self.close()
            raise VhostError(f"{path}: VHOST_SET_OWNER failed: {exc.strerror}") from exc
        self.path = path

    def set_mem_table(self, regions: Sequence[KernelRegion]) -> None:
        """VHOST_SET_MEM_TABLE; the kernel refuses more than max_mem_regions with E2BIG."""
        if self.fd is None:
            raise VhostError(f"{self.path} is closed")
        try:
            fcntl.ioctl(self.fd, VHOST_SET_MEM_TABLE, pack_vhost_memory(regions), True)
        except OSError as exc:
            raise VhostError(
                f"{self.path}: VHOST_SET_MEM_TABLE with {len(regions)} regions failed: "
                f"{exc.strerror}"
            ) from exc

    def close(self) -> None:
        """Close the device; the kernel drops its memory table with it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class VhostKernelModel:
    """vhost-kernel's memory table rules without the device: at most ``max_mem_regions``
    regions (E2BIG beyond, as ``vhost_set_memory`` answers), regions must not be empty."""

    is_real = False

    def __init__(self, max_mem_regions: int) -> None:
        self.max_mem_regions = max_mem_regions
        self.table: tuple[KernelRegion, ...] = ()
        self.calls = 0

    def set_mem_table(self, regions: Sequence[KernelRegion]) -> None:
        """Replace the table, or fail like the kernel without changing it."""
        if len(regions) > self.max_mem_regions:
            raise VhostError(
                f"vhost-kernel model: VHOST_SET_MEM_TABLE with {len(regions)} regions failed: "
                f"{os.strerror(errno.E2BIG)} (max_mem_regions is {self.max_mem_regions})"
            )
        if any(r.size == 0 for r in regions):
            raise VhostError(
                f"vhost-kernel model: VHOST_SET_MEM_TABLE failed: {os.strerror(errno.EINVAL)}"
            )
        self.table = tuple(regions)
        self.calls += 1

    def close(self) -> None:
        """Forget the table."""
        self.table = ()


class VhostKernelConsumer(VhostBackend):
    """A vhost-kernel back-end (QEMU's ``-netdev tap,vhost=on``): every RAM section costs a
    region, and the whole table is set at the end of each batch (VHOST_SET_MEM_TABLE).

    ``limit`` is the host's (:func:`memslots.host.vhost.vhost_kernel_memslots_limit`, detected
    once as ``HostInfo.vhost_kernel_max_mem_regions``); ``device`` is :class:`VhostNet` where
    the host has ``/dev/vhost-net``, else :class:`VhostKernelModel`. Until :meth:`start` the
    table is only recorded.
    """

    kind = "kernel"

    def __init__(self, name: str, device: VhostKernelDevice, *, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.device = device
        self._table: dict[Section, KernelRegion] = {}
        self._started = False
        self._changed = False
        self._refused = False

    @property
    def max_memslots(self) -> int:
        return self.limit

    @property
    def used_memslots(self) -> int:
        return len(self._table) + self.other_used

    @property
    def table(self) -> list[KernelRegion]:
        """The memory table, sorted by guest-physical address."""
        return sorted(self._table.values(), key=lambda r: r.gpa)

    def region_add(self, section: Section) -> None:
        if self._started and self.used_memslots >= self.limit:
            # Refusing here makes the address space undo the batch: the guest's request gets
            # BUSY instead of the kernel failing the whole table.
            self._refused = True
            raise VhostError(
                f"vhost back-end '{self.name}': no free memory region for '{section.name}' at "
                f"0x{section.gpa:x}: all {self.limit} are in use"
            )
        self._table[section] = KernelRegion(section.gpa, section.size, section.host_addr)
        self._changed = True

    def region_del(self, section: Section) -> None:
        del self._table[section]
        self._changed = True

    def commit(self) -> None:
        refused, self._refused = self._refused, False
        # After a refusal the address space replays the old view; set the table then.
        if self._started and self._changed and not refused:
            self.device.set_mem_table(self.table)
            self._changed = False

    def start(self) -> None:
        """Set the current table and keep it up to date from now on."""
        self._started = True
        self.device.set_mem_table(self.table)
        self._changed = False

    def stop(self) -> None:
        """Stop setting tables."""
        self._started = False

    def close(self) -> None:
        """Close the device."""
        self._started = False
        self.device.close()
