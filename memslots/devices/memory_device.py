"""What a memory device is to the rest of memslots: QEMU's ``MemoryDeviceClass`` and more.

The machine, the memslot budget, the monitor and the reports ask devices through this
interface only; they never look at a concrete device class. Where devices live and how they
are plugged is :mod:`memslots.devices.device_memory`; how many memslots they may use is
:mod:`memslots.devices.budget`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memslots.devices.qom import QomObject
from memslots.memory.address_space import MemoryRegion
from memslots.memory.backends import MemoryBackend


@dataclass(frozen=True)
class MemslotInfo:
    """One memslot of a device: where it is, whether it is mapped, how full it is.

    ``plugged_blocks`` is None for devices without blocks (pc-dimm).
    """

    index: int
    gpa: int
    size: int
    mapped: bool
    plugged_blocks: int | None


@dataclass(frozen=True)
class MemslotPlan:
    """How a device is exposed through memslots, as decided (a ``plan`` row's memslot columns).

    ``block_size`` is None for devices without blocks; every memslot but the last has
    ``memslot_size`` bytes.
    """

    block_size: int | None
    dynamic: bool
    memslots: int
    memslot_size: int
    last_memslot_size: int


SizeListener = Callable[["MemoryDevice", int], None]


class MemoryDevice(ABC):
    """What the memory-device layer needs from a device (QEMU's MemoryDeviceClass), and what
    everyone else asks it: QMP info, QOM properties, memslots, unplug checks."""

    id: str | None
    #: The memory backend behind the device (None until ``memdev`` is set).
    memdev: MemoryBackend | None
    #: Set when the device came with ``device_add`` rather than the command line.
    hotplugged: bool = False
    #: Called with the device and its new plugged size whenever that changes.
    size_change_listeners: list[SizeListener]
    #: Names of QOM children that are unrealized with the device (virtio-mem's virtio device),
    #: each announced with its own DEVICE_DELETED before the device's.
    qom_children: tuple[str, ...] = ()
    #: ``type`` in query-memory-devices ("dimm", "virtio-mem").
    info_type: str
    #: True for devices that implement ``decide_memslots`` (virtio-mem).
    decides_memslots: bool = False

    @property
    def label(self) -> str:
        """The id for messages, "(unnamed)" like QEMU when there is none."""
        return self.id if self.id else "(unnamed)"

    @abstractmethod
    def get_memory_region(self) -> MemoryRegion | None:
        """The region to map in device memory, or None for an empty device."""

    def get_memslots(self) -> int:
        """Memslots this device needs (1 unless the device says otherwise)."""
        return 1

    def decide_memslots(self, limit: int) -> None:
        """Told once, before realize, how many memslots the device may use."""
        raise NotImplementedError

    def get_min_alignment(self) -> int:
        """Minimum alignment of the device's address (0: none)."""
        return 0

    @abstractmethod
    def get_addr(self) -> int:
        """The device's guest-physical address (0: not assigned yet)."""

    @abstractmethod
    def set_addr(self, addr: int) -> None:
        """Assign the device's guest-physical address."""

    @abstractmethod
    def get_plugged_size(self) -> int:
        """Bytes of the device's memory the guest may use now."""

    @abstractmethod
    def realize(self) -> None:
        """Validate properties against the backend and take the backend (after pre-plug)."""

    @abstractmethod
    def unrealize(self) -> None:
        """Give the backend back (after unplug, or when plugging failed)."""

    def check_unplug(self) -> None:  # noqa: B027 - optional: most devices may always go
        """Refuse ``device_del`` while the device may not go (nothing to check by default)."""

    # -- what the monitor asks -----------------------------------------------------------------

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """The device's element of QMP ``query-memory-devices`` (QEMU's fill_device_info)."""

    @abstractmethod
    def qom_objects(self) -> dict[str, QomObject]:
        """The device's QOM objects: ``""`` for the device itself, then its children."""

    # -- memslots ----------------------------------------------------------------------------------

    @property
    def fd_backed(self) -> bool:
        """Whether the device's memory has an fd a vhost-user back-end could map.

        A device without a memdev says True: it cannot be looked into, so it is charged.
        """
        return self.memdev is None or self.memdev.memory.fd_backed

    def memslot_map(self) -> list[MemslotInfo]:
        """Every memslot of the device, mapped or not (one by default: the whole region)."""
        mr = self.get_memory_region()
        if mr is None:
            return []
        return [MemslotInfo(0, self.get_addr(), mr.size, mr.mapped, None)]

    @property
    def mapped_memslots(self) -> int:
        """How many of the device's memslots are mapped now."""
        return sum(1 for m in self.memslot_map() if m.mapped)

    def memslot_plan(self) -> MemslotPlan:
        """How the device is exposed through memslots (one memslot of the region by default)."""
        mr = self.get_memory_region()
        size = mr.size if mr is not None else 0
        return MemslotPlan(None, False, 1, size, size)
