"""Where memory sits in guest-physical space: QEMU's x86 ``pc`` machine layout.

The layout follows QEMU's x86 ``pc`` (i440fx) machine, the default of Debian's QEMU:

* boot RAM is split at 3 GiB when it reaches 3.5 GiB (``ram-below-4g`` at 0, the rest as
  ``ram-above-4g`` at 4 GiB); below that size it all sits below 4 GiB;
* the device-memory area starts at the next GiB boundary after boot RAM and spans
  ``maxmem - ram`` plus 1 GiB per DIMM slot;
* the vCPU is ``-cpu host``, so its vendor and physical address bits are the host's
  (:class:`memslots.kvm.host.HostInfo`, overridable for planning);
* with an AMD vCPU, when the highest used address (device memory plus the 2 GiB 64-bit PCI hole)
  reaches AMD's HyperTransport window at 1012 GiB, RAM above 4 GiB moves to 1 TiB, as QEMU 7.1+
  does (``pc_memory_init``, only ``IS_AMD_CPU``). ``-m 4G,maxmem=1028G`` thus puts device memory
  at ``0x10040000000`` on AMD and at ``0x140000000`` on Intel, exactly where QEMU puts it;
* the highest used address must fit the vCPU's physical address bits (QEMU's "phys-bits too
  low" check).

We do not model ROMs, the VGA hole or PCI BARs, so boot uses 1-2 memslots where QEMU uses ~12.
"""

from __future__ import annotations

from dataclasses import dataclass

from memslots.errors import OptionError
from memslots.options import MachineMemory
from memslots.sizes import GiB, TiB, align_up

#: Guest-physical space we model: 52 bits, the bound KVM applies with shadow paging.
PHYS_ADDR_SPACE = 1 << 52
LOWMEM_SPLIT = 0xE000_0000
LOWMEM = 0xC000_0000
FOUR_GIB = 4 * GiB
AMD_HT_START = 0xFD_0000_0000
AMD_ABOVE_1TB_START = 1 * TiB
PCI_HOLE64_SIZE = 2 * GiB
#: ACPI_MAX_RAM_SLOTS.
MAX_DIMM_SLOTS = 256


@dataclass(frozen=True)
class Layout:
    """Where boot RAM and device memory sit in guest-physical space."""

    below_4g: int
    above_4g: int
    above_4g_start: int
    device_memory_base: int
    device_memory_size: int

    @property
    def above_4g_end(self) -> int:
        """First address after RAM above 4 GiB."""
        return self.above_4g_start + self.above_4g


def pc_layout(mem: MachineMemory, *, cpu_vendor: str, phys_bits: int) -> Layout:
    """QEMU pc (i440fx) memory layout for ``-m`` with a vCPU of this vendor and these physical
    address bits (see the module docstring)."""
    below = LOWMEM if mem.ram_size >= LOWMEM_SPLIT else mem.ram_size
    above = mem.ram_size - below
    if mem.slots > MAX_DIMM_SLOTS:
        raise OptionError(f"unsupported amount of memory slots: {mem.slots}")
    dev_size = 0
    if mem.maxmem > mem.ram_size:
        dev_size = mem.maxmem - mem.ram_size + mem.slots * GiB

    def dev_base(above_start: int) -> int:
        return align_up(above_start + above, GiB)

    def max_used_gpa(above_start: int) -> int:
        """The end of the 64-bit PCI hole, which follows device memory (or RAM)."""
        end = dev_base(above_start) + dev_size if dev_size else above_start + above
        return align_up(end, GiB) + PCI_HOLE64_SIZE - 1

    start = FOUR_GIB
    if cpu_vendor == "amd" and max_used_gpa(start) >= AMD_HT_START:
        start = AMD_ABOVE_1TB_START
    limit = (1 << phys_bits) - 1
    if max_used_gpa(start) > limit:
        raise OptionError(
            f"Address space limit 0x{limit:x} < 0x{max_used_gpa(start):x} phys-bits too low "
            f"({phys_bits})"
        )
    base = dev_base(start) if dev_size else 0
    return Layout(below, above, start, base, dev_size)
