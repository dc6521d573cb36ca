"""The device-memory area: where memory devices live and what they were promised.

This reproduces QEMU's ``hw/mem/memory-device.c`` (8.2+): the device-memory area, address
assignment, the required/used/reserved memslot counters, and pre-plug, plug and unplug. How many
memslots a device may use, and the refusals when KVM or a vhost back-end could not take them,
are the budget's (:mod:`memslots.devices.budget`). Messages start with QEMU's text and then name
the device and the numbers.
"""

from __future__ import annotations

import logging

from memslots.devices.budget import MemslotBudget
from memslots.devices.memory_device import MemoryDevice
from memslots.errors import MemoryDeviceError
from memslots.memory.address_space import AddressSpace, MemoryRegion, Section
from memslots.sizes import align_up, format_size, hex_size

log = logging.getLogger("memslots.devices.device_memory")


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
        budget: MemslotBudget,
    ) -> None:
        self.address_space = address_space
        self.base = base
        #: What memory devices may use in total: ``maxmem - ram``.
        self.total_space = total_space
        #: The memslot budget that decides for and refuses devices; it reads our counters.
        self.budget = budget
        self.region = MemoryRegion.container("device-memory", region_size)
        address_space.add_subregion(address_space.root, base, self.region)
        self.used_region_size = 0
        self.required_memslots = 0
        self.used_memslots = 0
        self.auto_decision_active = 0
        self.devices: list[MemoryDevice] = []
        address_space.register(self)
        budget.device_memory = self

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

    def check_addable(self, dev: MemoryDevice, mr: MemoryRegion) -> None:
        """Decide the device's memslots and refuse what the budget or the space cannot take."""
        size = mr.size
        self.budget.check_addable(dev, size)
        if self.used_region_size + size > self.total_space:
            raise MemoryDeviceError(
                f"not enough space, currently 0x{self.used_region_size:x} in use of total "
                f"space for memory devices 0x{self.total_space:x} "
                f"({format_size(self.used_region_size)} of {format_size(self.total_space)} in "
                f"use; device '{dev.label}' needs 0x{size:x}, {format_size(size)})"
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
                raise MemoryDeviceError(
                    f"address must be aligned to 0x{align:x} bytes ({format_size(align)})"
                )
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
        # QEMU 9.0 (commit 540a1abb; 8.2.0 had dropped the check): a region whose size is not
        # a multiple of its own alignment (a DIMM of 1 GiB + 1 byte) makes no sense.
        if mr.align and mr.size % mr.align:
            raise MemoryDeviceError(f"backend memory size must be multiple of {hex_size(mr.align)}")
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
