"""What a memory device is to the rest of memslots: QEMU's ``MemoryDeviceClass`` and more.

The machine, the memslot budget, the monitor and the reports ask devices through this
interface only; they never look at a concrete device class. Where devices live and how they
are plugged is :mod:`memslots.devices.device_memory`; how many memslots they may use is
:mod:`memslots.devices.budget`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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


class MemoryDevice(ABC):
    """What the memory-device layer needs from a device (QEMU's MemoryDeviceClass)."""

    id: str | None
    #: The memory backend behind the device (None until ``memdev`` is set).
    memdev: MemoryBackend | None
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
