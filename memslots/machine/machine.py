"""The machine: boot RAM, the device-memory area, backends, memory devices and KVM.

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

import logging
from collections.abc import Callable
from dataclasses import dataclass

from memslots.closing import Closing
from memslots.devices.dimm import PcDimm
from memslots.devices.memory_device import DeviceMemory, MemoryDevice
from memslots.devices.vhost_user import (
    VhostUserDevice,
    VhostUserDeviceOptions,
    attach_vhost_user_device,
)
from memslots.devices.virtio_mem import VirtioMem
from memslots.errors import ConfigError, MemoryDeviceError, OptionError
from memslots.kvm.abi import VmBackend
from memslots.kvm.accel import KvmAccel
from memslots.kvm.cost import MmuConfig, detect_host_mmu, slot_metadata_bytes
from memslots.kvm.host import HostInfo, host_info
from memslots.kvm.model import KvmModel
from memslots.kvm.vm import KvmVm, kvm_available
from memslots.memory.address_space import AddressSpace, MemoryRegion
from memslots.memory.backends import MemoryBackend, create_backend
from memslots.memory.consumer import MemslotConsumer
from memslots.options import (
    BackendOptions,
    DeviceOptions,
    MachineConfig,
    MachineMemory,
    VirtioMemOptions,
)
from memslots.sizes import GiB, TiB, align_up
from memslots.vhost.kernel import VhostSet

log = logging.getLogger("memslots.machine.machine")

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


def create_vm(accel: str, *, max_memslots: int | None = None) -> VmBackend:
    """A VM for ``-accel``: the real kernel (``kvm``), the model (``sim``), or either (auto)."""
    if accel == "kvm" or (accel == "auto" and kvm_available()):
        return KvmVm()
    if accel == "auto":
        log.warning("/dev/kvm is not available: using the KVM model instead of the kernel")
    return KvmModel(
        max_memslots=max_memslots if max_memslots is not None else 32764, mmu=detect_host_mmu()
    )


class Machine(Closing):
    """A machine built from a :class:`MachineConfig`, with its memory map and memslots.

    Devices are plugged in command-line order, each through QEMU's sequence: pre-plug
    (memslot decision, budget and space checks, address), realize, plug (map the region).
    """

    def __init__(
        self,
        config: MachineConfig,
        *,
        vm: VmBackend | None = None,
        planned: bool = False,
        vhost: list[MemslotConsumer] | None = None,
        before_devices: Callable[[Machine], None] | None = None,
        host: HostInfo | None = None,
        incoming: bool = False,
    ) -> None:
        self.config = config
        self.planned = planned
        #: The destination of an incoming migration (QEMU's ``-incoming``): virtio-mem devices
        #: skip their initial discard at realize. Clear it once the migration is done.
        self.incoming = incoming
        #: The host the machine runs on (or, for ``plan``, is planned for).
        self.host = host if host is not None else host_info()
        self.layout = pc_layout(
            config.memory, cpu_vendor=self.host.cpu_vendor, phys_bits=self.host.phys_bits
        )
        self.vm = vm if vm is not None else create_vm(config.accel)
        self.kvm = KvmAccel(self.vm)
        self.address_space = AddressSpace(
            "memory", MemoryRegion.container("system", PHYS_ADDR_SPACE)
        )
        self.vhost = VhostSet()
        self.backends: dict[str, MemoryBackend] = {}
        self.devices: dict[str, MemoryDevice] = {}
        self._anon_devices: list[MemoryDevice] = []
        self._dimm_slots: set[int] = set()
        self.chardevs = {c.id: c for c in config.chardevs}
        self.vhost_devices: dict[str, VhostUserDevice] = {}
        self._anon_vhost: list[VhostUserDevice] = []
        self.device_memory: DeviceMemory | None = None
        self.boot_ram: MemoryBackend | None = None
        try:
            self.address_space.register(self.kvm)
            for consumer in vhost or ():
                self.add_vhost(consumer)
            self._map_boot_ram()
            if self.layout.device_memory_size:
                self.device_memory = DeviceMemory(
                    self.address_space,
                    self.layout.device_memory_base,
                    self.layout.device_memory_size,
                    config.memory.device_memory_size,
                    kvm=self.kvm,
                    vhost=self.vhost,
                )
            for opts in config.backends:
                self.add_backend(opts)
            if before_devices is not None:
                before_devices(self)
            for dev in config.devices:
                if isinstance(dev, VhostUserDeviceOptions):
                    self.add_vhost_user_device(dev)
                else:
                    self.add_device(dev)
        except BaseException:
            self.close()
            raise

    # -- construction ------------------------------------------------------------------------

    def _map_boot_ram(self) -> None:
        ram = BackendOptions(
            qom_type="memory-backend-ram",
            id="pc.ram",
            size=self.config.memory.ram_size,
            share=False,
            reserve=False,
        )
        self.boot_ram = create_backend(ram, planned=self.planned)
        lay = self.layout
        with self.address_space.transaction():
            below = MemoryRegion.alias("ram-below-4g", self.boot_ram.region, 0, lay.below_4g)
            self.address_space.add_subregion(self.address_space.root, 0, below)
            if lay.above_4g:
                above = MemoryRegion.alias(
                    "ram-above-4g", self.boot_ram.region, lay.below_4g, lay.above_4g
                )
                self.address_space.add_subregion(self.address_space.root, lay.above_4g_start, above)

    def set_free_memslots(self, consumer: MemslotConsumer, free: int, flag: str) -> None:
        """Describe a host where ``consumer`` has exactly ``free`` memslots free now.

        The difference is charged to ``consumer.other_used`` (ROMs, BARs, other devices that
        we do not model). ``flag`` names the option for the error message.
        """
        other = consumer.free_memslots + consumer.other_used - free
        if other < 0:
            raise OptionError(
                f"{flag} {free}: {consumer.name} can have at most "
                f"{consumer.free_memslots + consumer.other_used} memslots free after boot RAM "
                f"({consumer.used_memslots - consumer.other_used} used by boot RAM of "
                f"{consumer.max_memslots})"
            )
        consumer.other_used = other

    def add_vhost(self, consumer: MemslotConsumer) -> None:
        """Register a vhost back-end with the address space and the budget."""
        self.address_space.register(consumer)
        self.vhost.add(consumer)

    def add_backend(self, opts: BackendOptions) -> MemoryBackend:
        """Create a memory backend object (``-object`` / ``object-add``)."""
        if opts.id in self.backends:
            raise ConfigError(f"attempt to add duplicate property '{opts.id}' to object")
        backend = create_backend(opts, planned=self.planned)
        self.backends[opts.id] = backend
        return backend

    def remove_backend(self, backend_id: str) -> None:
        """Delete a memory backend object (``object-del``); refused while a device uses it."""
        backend = self.backends.get(backend_id)
        if backend is None:
            raise ConfigError(f"object '{backend_id}' not found")
        if backend.used_by is not None:
            raise ConfigError(
                f"object '{backend_id}' can't be deleted: it is used by device '{backend.used_by}'"
            )
        del self.backends[backend_id]
        backend.close()

    def add_vhost_user_device(self, opts: VhostUserDeviceOptions) -> VhostUserDevice:
        """Connect a vhost-user device's back-end, with QEMU's memslot checks."""
        if opts.id is not None and (opts.id in self.devices or opts.id in self.vhost_devices):
            raise ConfigError(f"Duplicate device ID '{opts.id}'")
        dev = attach_vhost_user_device(self, opts, self.chardevs)
        if opts.id is not None:
            self.vhost_devices[opts.id] = dev
        else:
            self._anon_vhost.append(dev)
        return dev

    def add_device(self, opts: DeviceOptions) -> MemoryDevice:
        """Create, pre-plug, realize and plug a memory device; nothing remains on failure."""
        if opts.id is not None and (opts.id in self.devices or opts.id in self.vhost_devices):
            raise ConfigError(f"Duplicate device ID '{opts.id}'")
        memdev = None
        if opts.memdev is not None:
            memdev = self.backends.get(opts.memdev)
            if memdev is None:
                raise ConfigError(
                    f"Property '{opts.driver}.memdev' can't find value '{opts.memdev}'"
                )
        dev: VirtioMem | PcDimm
        if isinstance(opts, VirtioMemOptions):
            dev = VirtioMem(opts, memdev, self.address_space)
            dev.incoming = self.incoming
        else:
            dev = PcDimm(opts, memdev)
            self._assign_dimm_slot(dev)
        try:
            if dev.get_memory_region() is not None and self.device_memory is None:
                raise MemoryDeviceError(
                    "the configuration is not prepared for memory devices (e.g., for memory "
                    "hotplug), consider specifying the maxmem option"
                )
            assert self.device_memory is not None
            self.device_memory.pre_plug(dev)
            dev.realize()
            try:
                self.device_memory.plug(dev)
            except BaseException:
                dev.unrealize()
                raise
        except BaseException:
            if isinstance(dev, PcDimm):
                self._dimm_slots.discard(dev.slot)
            raise
        if dev.id is not None:
            self.devices[dev.id] = dev
        else:
            self._anon_devices.append(dev)
        return dev

    def _assign_dimm_slot(self, dimm: PcDimm) -> None:
        """QEMU's pc_dimm_get_free_slot: the requested slot, or the first free one."""
        slots = self.config.memory.slots
        if not slots:
            raise MemoryDeviceError("no slots where allocated, please specify the 'slots' option")
        wanted = dimm.opts.slot
        if wanted is not None:
            if wanted >= slots:
                raise MemoryDeviceError(
                    f"invalid slot number {wanted}, valid range is [0-{slots - 1}]"
                )
            if wanted in self._dimm_slots:
                raise MemoryDeviceError(f"slot {wanted} is busy")
            slot = wanted
        else:
            free = [s for s in range(slots) if s not in self._dimm_slots]
            if not free:
                raise MemoryDeviceError("no free slots available")
            slot = free[0]
        dimm.slot = slot
        self._dimm_slots.add(slot)

    def remove_device(self, dev_id: str) -> None:
        """Unplug a device (``device_del``); virtio-mem must have nothing plugged."""
        vhost_dev = self.vhost_devices.pop(dev_id, None)
        if vhost_dev is not None:
            vhost_dev.detach()
            return
        dev = self.devices.get(dev_id)
        if dev is None:
            raise ConfigError(f"Device '{dev_id}' not found")
        if isinstance(dev, VirtioMem):
            dev.check_unplug()
        self.withdraw_device(dev)

    def withdraw_device(self, dev: MemoryDevice) -> None:
        """Unplug a device without the guest-facing checks: for undoing a plug that could not
        be completed (for example when its guest driver could not be attached)."""
        assert self.device_memory is not None
        self.device_memory.unplug(dev)
        dev.unrealize()
        if isinstance(dev, PcDimm):
            self._dimm_slots.discard(dev.slot)
        if dev.id is not None:
            self.devices.pop(dev.id, None)
        elif dev in self._anon_devices:
            self._anon_devices.remove(dev)

    # -- queries -------------------------------------------------------------------------------

    @property
    def memory_devices(self) -> list[MemoryDevice]:
        """All memory devices, by address."""
        devs = list(self.devices.values()) + self._anon_devices
        return sorted(devs, key=lambda d: d.get_addr())

    def virtio_mem(self, dev_id: str) -> VirtioMem:
        """The virtio-mem device with this id."""
        dev = self.devices.get(dev_id)
        if not isinstance(dev, VirtioMem):
            raise ConfigError(f"no virtio-mem device with id '{dev_id}'")
        return dev

    @property
    def mmu(self) -> MmuConfig:
        """The MMU configuration that decides what memslots cost the kernel."""
        return self.vm.mmu

    def device_metadata_bytes(self, dev: MemoryDevice) -> tuple[int, int]:
        """Kernel metadata with the device fully plugged: one memslot vs its memslots."""
        mr = dev.get_memory_region()
        if mr is None:
            return 0, 0
        single = slot_metadata_bytes(dev.get_addr(), mr.size, self.mmu)
        if not isinstance(dev, VirtioMem) or not dev.dynamic:
            return single, single
        return single, sum(slot_metadata_bytes(m.gpa, m.size, self.mmu) for m in dev.memslot_map())

    def close(self) -> None:
        """Tell vhost back-ends, close the VM (freeing its memslots), release host memory."""
        for vdev in [
            *getattr(self, "vhost_devices", {}).values(),
            *getattr(self, "_anon_vhost", []),
        ]:
            vdev.detach()
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        for backend in list(getattr(self, "backends", {}).values()):
            backend.close()
        boot = getattr(self, "boot_ram", None)
        if boot is not None:
            boot.close()
