"""The memory-device layer: where memory devices live and how many memslots they may use.

This reproduces QEMU's ``hw/mem/memory-device.c`` (8.2+): the device-memory area, address
assignment, the required/used/reserved memslot counters, the automatic decision of how many
memslots a device gets, and the refusals in pre-plug. Messages start with QEMU's text and then
name the device and the numbers.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod

from memslots.errors import MemoryDeviceError, NotEnoughMemslotsError
from memslots.memory.address_space import AddressSpace, MemoryRegion, Section
from memslots.memory.consumer import MemslotConsumer
from memslots.sizes import align_up
from memslots.vhost.backend import VhostSet

log = logging.getLogger("memslots.devices.memory_device")

#: Soft cap on the memslots all memory devices together ask for (the old DIMM limit).
SOFT_MEMSLOT_LIMIT = 256
#: Below this many memslots in KVM or any vhost back-end, auto-deciding devices get 1.
SAFE_MAX_MEMSLOTS = 509


class MemoryDevice(ABC):
    """What the memory-device layer needs from a device (QEMU's MemoryDeviceClass)."""

    id: str | None
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


def _c_double_to_uint(value: float) -> int:
    """What x86-64 C code gets from ``(unsigned int)double``: truncation, 32-bit wrap.

    Out-of-range values (inf from a division by zero, or beyond 2^63) convert to the
    "integer indefinite" 2^63 whose low 32 bits are 0.
    """
    if not math.isfinite(value) or value >= 2.0**63:
        return 0
    return int(value) & 0xFFFFFFFF


class DeviceMemory:
    """The device-memory area of a machine and the memslot accounting of its devices.

    It owns the "device-memory" container in the system address space and listens to that
    address space to count the RAM sections that memory devices really map (``used``).
    """

    def __init__(
        self,
        address_space: AddressSpace,
        base: int,
        region_size: int,
        total_space: int,
        *,
        kvm: MemslotConsumer | None,
        vhost: VhostSet,
    ) -> None:
        self.address_space = address_space
        self.base = base
        #: What memory devices may use in total: ``maxmem - ram``.
        self.total_space = total_space
        self.kvm = kvm
        self.vhost = vhost
        self.region = MemoryRegion.container("device-memory", region_size)
        address_space.add_subregion(address_space.root, base, self.region)
        self.used_region_size = 0
        self.required_memslots = 0
        self.used_memslots = 0
        self.auto_decision_active = 0
        self.devices: list[MemoryDevice] = []
        address_space.register(self)

    @property
    def size(self) -> int:
        """Size of the device-memory container."""
        return self.region.size

    # -- listener: count what memory devices really map --------------------------------------

    def _mine(self, section: Section) -> bool:
        return self.base <= section.gpa < self.base + self.region.size

    def begin(self) -> None:
        """Part of the listener interface; nothing to prepare."""

    def commit(self) -> None:
        """Part of the listener interface; nothing to finish."""

    def region_add(self, section: Section) -> None:
        """A section appeared: one more memslot used if it lies in device memory."""
        if self._mine(section):
            self.used_memslots += 1
            if self.used_memslots > self.required_memslots:
                log.warning("Memory devices use more memory slots than indicated as required.")

    def region_del(self, section: Section) -> None:
        """A section disappeared: one memslot less if it lay in device memory."""
        if self._mine(section):
            self.used_memslots -= 1

    # -- accounting ----------------------------------------------------------------------------

    @property
    def reserved_memslots(self) -> int:
        """Memslots promised to devices but not mapped yet (``required - used``, >= 0)."""
        return max(0, self.required_memslots - self.used_memslots)

    @property
    def auto_decision(self) -> bool:
        """True while a device that auto-decided on more than one memslot is plugged."""
        return self.auto_decision_active != 0

    def consumer_limits(self) -> tuple[int, int]:
        """``(max, free)`` over KVM (when enabled) and every vhost back-end."""
        max_slots = self.vhost.max_memslots()
        free = self.vhost.free_memslots()
        if self.kvm is not None:
            max_slots = min(max_slots, self.kvm.max_memslots)
            free = min(free, self.kvm.free_memslots)
        return max_slots, free

    def decision_limit(self, size: int) -> int:
        """How many memslots a device of ``size`` bytes may use (QEMU's decision limit)."""
        max_slots, free = self.consumer_limits()
        reserved = self.reserved_memslots
        if max_slots < SAFE_MAX_MEMSLOTS:
            return 1
        if self.required_memslots >= SOFT_MEMSLOT_LIMIT:
            return 1
        memslots = SOFT_MEMSLOT_LIMIT - self.required_memslots
        # QEMU subtracts unsigned; free < reserved would wrap, and is caught here.
        if free < reserved:
            return 1
        memslots = min(memslots, free - reserved)
        if memslots < 1:
            return 1
        if size == self.total_space:
            return memslots
        available = self.total_space - self.used_region_size
        ratio = float(memslots) * float(size) / float(available) if available else math.inf
        return max(1, _c_double_to_uint(ratio))

    def check_addable(self, dev: MemoryDevice, mr: MemoryRegion) -> None:
        """Decide the device's memslots (if it decides) and refuse what does not fit."""
        size = mr.size
        reserved = self.reserved_memslots
        if dev.decides_memslots:
            dev.decide_memslots(self.decision_limit(size))
        required = dev.get_memslots()
        if self.kvm is not None and self.kvm.free_memslots < required + reserved:
            raise NotEnoughMemslotsError(
                "hypervisor has not enough free memory slots left: "
                f"device '{dev.label}' needs {required} memslot(s) and {reserved} more are "
                f"reserved by other memory devices, but KVM has only "
                f"{self.kvm.free_memslots} of {self.kvm.max_memslots} free",
                consumer="kvm",
                needed=required + reserved,
                free=self.kvm.free_memslots,
            )
        vhost_free = self.vhost.free_memslots()
        if vhost_free < required + reserved:
            tightest = min(self.vhost.backends, key=lambda b: b.free_memslots)
            raise NotEnoughMemslotsError(
                "a used vhost backend has not enough free memory slots left: "
                f"device '{dev.label}' needs {required} memslot(s) and {reserved} more are "
                f"reserved by other memory devices, but vhost back-end '{tightest.name}' has "
                f"only {vhost_free} of {tightest.max_memslots} free",
                consumer=tightest.name,
                needed=required + reserved,
                free=vhost_free,
            )
        if self.used_region_size + size > self.total_space:
            raise MemoryDeviceError(
                f"not enough space, currently 0x{self.used_region_size:x} in use of total "
                f"space for memory devices 0x{self.total_space:x} "
                f"(device '{dev.label}' needs 0x{size:x})"
            )

    def get_free_addr(self, hint: int | None, align: int, size: int) -> int:
        """Find (or check) a guest-physical address for a region of ``size`` bytes."""
        lo, area = self.base, self.region.size
        hi = lo + area
        if align and lo % align:
            log.warning(
                "the alignment (0x%x) exceeds the expected maximum alignment, memory will get "
                "fragmented and not all 'maxmem' might be usable for memory devices.",
                align,
            )
        if hint is not None:
            if align and hint % align:
                raise MemoryDeviceError(f"address must be aligned to 0x{align:x} bytes")
            if hint < lo or hint + size > hi:
                raise MemoryDeviceError(
                    f"can't add memory device [0x{hint:x}:0x{size:x}], usable range for memory "
                    f"devices [0x{lo:x}:0x{area:x}]"
                )
            start = hint
        else:
            start = align_up(lo, align) if align else lo
        for other in sorted(self.devices, key=lambda d: d.get_addr()):
            omr = other.get_memory_region()
            if omr is None:
                continue
            o_lo, o_hi = other.get_addr(), other.get_addr() + omr.size
            if o_lo < start + size and start < o_hi:
                if hint is not None:
                    raise MemoryDeviceError(
                        f"address range conflicts with memory device id='{other.label}'"
                    )
                start = align_up(o_hi, align) if align else o_hi
            elif o_lo >= start + size:
                break
        if start < lo or start + size > hi:
            raise MemoryDeviceError(
                "could not find position in guest address space for memory device - memory "
                "fragmented due to alignments"
            )
        return start

    # -- plug / unplug -------------------------------------------------------------------------

    def pre_plug(self, dev: MemoryDevice, legacy_align: int | None = None) -> None:
        """QEMU's ``memory_device_pre_plug``: decide, check budgets and space, place."""
        mr = dev.get_memory_region()
        if mr is None:
            return
        self.check_addable(dev, mr)
        # QEMU 8.2.1+/9.0: a region whose size is not a multiple of its own alignment (a DIMM
        # of 1 GiB + 1 byte) makes no sense as a memory device.
        if mr.align and mr.size % mr.align:
            raise MemoryDeviceError(f"backend memory size must be multiple of 0x{mr.align:x}")
        device_align = max(dev.get_min_alignment(), mr.align)
        align = legacy_align if legacy_align is not None else device_align
        addr = dev.get_addr()
        dev.set_addr(self.get_free_addr(addr if addr else None, align, mr.size))

    def plug(self, dev: MemoryDevice) -> None:
        """Account for the device and map its region into device memory."""
        mr = dev.get_memory_region()
        if mr is None:
            return
        memslots = dev.get_memslots()
        auto = dev.decides_memslots and memslots > 1
        # Counters first, as QEMU does, so the listener sees used <= required while mapping.
        self.used_region_size += mr.size
        self.required_memslots += memslots
        self.auto_decision_active += auto
        try:
            self.address_space.add_subregion(self.region, dev.get_addr() - self.base, mr)
        except Exception:
            self.used_region_size -= mr.size
            self.required_memslots -= memslots
            self.auto_decision_active -= auto
            raise
        self.devices.append(dev)

    def unplug(self, dev: MemoryDevice) -> None:
        """Unmap the device's region and give its accounting back."""
        mr = dev.get_memory_region()
        if mr is None:
            return
        memslots = dev.get_memslots()
        self.address_space.del_subregion(self.region, mr)
        if dev.decides_memslots and memslots > 1:
            self.auto_decision_active -= 1
        self.used_region_size -= mr.size
        self.required_memslots -= memslots
        self.devices.remove(dev)
