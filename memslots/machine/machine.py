"""The machine: boot RAM, the device-memory area, backends, memory devices, KVM and vhost.

Where things sit in guest-physical space is :mod:`memslots.machine.layout` (QEMU's pc machine).
Devices are plugged in command-line order, each through QEMU's sequence (pre-plug, realize,
plug); the machine owns the address space, so it also attaches and detaches vhost back-ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import overload

from memslots.closing import Closing
from memslots.devices.budget import MemslotBudget
from memslots.devices.device_memory import DeviceMemory
from memslots.devices.dimm import PcDimm
from memslots.devices.memory_device import MemoryDevice
from memslots.devices.vhost_user import VhostUserDevice, attach_vhost_user_device
from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import ConfigError, MemoryDeviceError, OptionError
from memslots.kvm.abi import VmBackend
from memslots.kvm.accel import KvmAccel
from memslots.kvm.cost import slot_metadata_bytes
from memslots.kvm.host import HostInfo, host_info
from memslots.kvm.mmu import MmuConfig
from memslots.kvm.model import KvmModel
from memslots.kvm.vm import KvmVm
from memslots.machine.layout import PHYS_ADDR_SPACE, pc_layout
from memslots.memory.address_space import AddressSpace, MemoryRegion
from memslots.memory.backends import MemoryBackend, PlannedAddresses, create_backend
from memslots.memory.consumer import MemslotConsumer
from memslots.options import (
    BackendOptions,
    DeviceOptions,
    DimmOptions,
    MachineConfig,
    VhostUserDeviceOptions,
    VirtioMemOptions,
)
from memslots.vhost.backend import VhostBackend

log = logging.getLogger("memslots.machine.machine")


def uses_real_kvm(accel: str, host: HostInfo | None = None) -> bool:
    """Whether :func:`create_vm` gives ``-accel accel`` the real kernel on ``host`` (default:
    this one)."""
    return accel == "kvm" or (accel == "auto" and (host or host_info()).kvm)


def create_vm(
    accel: str,
    *,
    host: HostInfo | None = None,
    max_memslots: int | None = None,
    slot_zap_all: bool = False,
) -> VmBackend:
    """A VM for ``-accel`` on ``host`` (default: this one): the real kernel (``kvm``), the
    model (``sim``), or either (auto).

    ``slot_zap_all`` is ``-accel``'s property: keep KVM's SLOT_ZAP_ALL quirk (else disabled
    where the kernel offers it).
    """
    host = host or host_info()
    if uses_real_kvm(accel, host):
        return KvmVm(slot_zap_all=slot_zap_all, mmu=host.mmu)
    if accel == "auto":
        log.warning("/dev/kvm is not available: using the KVM model instead of the kernel")
    return KvmModel(
        max_memslots=max_memslots if max_memslots is not None else host.kvm_max_memslots,
        mmu=host.mmu,
        slot_zap_all=slot_zap_all,
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
        vhost: list[VhostBackend] | None = None,
        before_devices: Callable[[Machine], None] | None = None,
        host: HostInfo | None = None,
        vhost_user_limit: int | None = None,
        incoming: bool = False,
    ) -> None:
        self.config = config
        self.planned = planned
        #: For a planned machine: the memslot limit its vhost-user back-ends are assumed to
        #: report (``plan --vhost-user-max-memslots``), since plan connects to none.
        self.vhost_user_limit = vhost_user_limit
        #: The destination of an incoming migration (QEMU's ``-incoming``): virtio-mem devices
        #: skip their initial discard at realize. Clear it once the migration is done.
        self.incoming = incoming
        #: The host the machine runs on (or, for ``plan``, is planned for).
        self.host = host if host is not None else host_info()
        self.layout = pc_layout(
            config.memory, cpu_vendor=self.host.cpu_vendor, phys_bits=self.host.phys_bits
        )
        self.vm = (
            vm
            if vm is not None
            else create_vm(config.accel, host=self.host, slot_zap_all=config.slot_zap_all)
        )
        #: Fake host addresses of this machine's planned memory.
        self._planned_addresses = PlannedAddresses()
        self.kvm = KvmAccel(self.vm)
        self.address_space = AddressSpace(
            "memory", MemoryRegion.container("system", PHYS_ADDR_SPACE)
        )
        #: Every memslot consumer and every rule about them.
        self.budget = MemslotBudget(self.address_space, self.kvm)
        self.backends: dict[str, MemoryBackend] = {}
        self.devices: dict[str, MemoryDevice] = {}
        self._anon_devices: list[MemoryDevice] = []
        #: The virtio-mem devices among them (the machine made them, so it knows).
        self._virtio_mem: list[VirtioMem] = []
        #: The ACPI slot of every DIMM.
        self._dimm_slots: dict[MemoryDevice, int] = {}
        self.chardevs = {c.id: c for c in config.chardevs}
        self.vhost_devices: dict[str, VhostUserDevice] = {}
        self._anon_vhost: list[VhostUserDevice] = []
        self.device_memory: DeviceMemory | None = None
        self.boot_ram: MemoryBackend | None = None
        try:
            self.address_space.register(self.kvm)
            for consumer in vhost or ():
                self.budget.add_vhost(consumer)
            self._map_boot_ram()
            if self.layout.device_memory_size:
                self.device_memory = DeviceMemory(
                    self.address_space,
                    self.layout.device_memory_base,
                    self.layout.device_memory_size,
                    config.memory.device_memory_size,
                    budget=self.budget,
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
            self._release(abandon=True)
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
        self.boot_ram = self._create_backend(ram)
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

    def add_backend(self, opts: BackendOptions) -> MemoryBackend:
        """Create a memory backend object (``-object`` / ``object-add``)."""
        if opts.id in self.backends:
            raise ConfigError(f"attempt to add duplicate property '{opts.id}' to object")
        backend = self._create_backend(opts)
        self.backends[opts.id] = backend
        return backend

    def _create_backend(self, opts: BackendOptions) -> MemoryBackend:
        return create_backend(
            opts, pages=self.host.pages, planned=self.planned, addresses=self._planned_addresses
        )

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
        chardev = self.chardevs.get(opts.chardev)
        if chardev is None:
            raise ConfigError(f"Property '{opts.driver}.chardev' can't find value '{opts.chardev}'")
        name = opts.id if opts.id is not None else f"{opts.driver}@{opts.chardev}"
        if any(d.attached and d.opts.chardev == opts.chardev for d in self.vhost_user_devices):
            raise ConfigError(
                f"Property '{opts.driver}.chardev' can't take value '{opts.chardev}', it's in use"
            )
        if name in self.devices or any(b.name == name for b in self.budget.vhost_backends):
            raise ConfigError(f"Duplicate device ID '{name}'")
        planned_limit = None
        if self.planned:
            if self.vhost_user_limit is None:
                raise OptionError(
                    f"{opts.driver} '{name}': plan connects to no vhost-user back-end; give the "
                    "memslot limit its back-end reports with --vhost-user-max-memslots N (QEMU: "
                    "8 without CONFIGURE_MEM_SLOTS, else the back-end's, at most 512)"
                )
            planned_limit = self.vhost_user_limit
        dev = attach_vhost_user_device(
            self.budget, opts, chardev, name, planned_limit=planned_limit
        )
        if opts.id is not None:
            self.vhost_devices[opts.id] = dev
        else:
            self._anon_vhost.append(dev)
        return dev

    @overload
    def add_device(self, opts: VirtioMemOptions) -> VirtioMem: ...

    @overload
    def add_device(self, opts: DimmOptions) -> PcDimm: ...

    @overload
    def add_device(self, opts: DeviceOptions) -> MemoryDevice: ...

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
        dev: MemoryDevice
        virtio_mem = None
        if isinstance(opts, VirtioMemOptions):
            dev = virtio_mem = VirtioMem(opts, memdev, self.address_space, pages=self.host.pages)
            virtio_mem.incoming = self.incoming
        else:
            dimm = PcDimm(opts, memdev)
            self._assign_dimm_slot(dimm)
            dev = dimm
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
            self._dimm_slots.pop(dev, None)
            raise
        if dev.id is not None:
            self.devices[dev.id] = dev
        else:
            self._anon_devices.append(dev)
        if virtio_mem is not None:
            self._virtio_mem.append(virtio_mem)
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
            if wanted in self._dimm_slots.values():
                raise MemoryDeviceError(f"slot {wanted} is busy")
            slot = wanted
        else:
            taken = set(self._dimm_slots.values())
            free = [s for s in range(slots) if s not in taken]
            if not free:
                raise MemoryDeviceError("no free slots available")
            slot = free[0]
        dimm.slot = slot
        self._dimm_slots[dimm] = slot

    def remove_device(self, dev_id: str) -> None:
        """Unplug a device (``device_del``); virtio-mem must have nothing plugged."""
        vhost_dev = self.vhost_devices.pop(dev_id, None)
        if vhost_dev is not None:
            vhost_dev.detach()
            return
        dev = self.devices.get(dev_id)
        if dev is None:
            raise ConfigError(f"Device '{dev_id}' not found")
        dev.check_unplug()
        self.withdraw_device(dev)

    def withdraw_device(self, dev: MemoryDevice) -> None:
        """Unplug a device without the guest-facing checks: for undoing a plug that could not
        be completed (for example when its guest driver could not be attached)."""
        assert self.device_memory is not None
        self.device_memory.unplug(dev)
        dev.unrealize()
        self._dimm_slots.pop(dev, None)
        if dev.id is not None:
            self.devices.pop(dev.id, None)
        elif dev in self._anon_devices:
            self._anon_devices.remove(dev)
        self._virtio_mem = [v for v in self._virtio_mem if v is not dev]

    # -- reset -------------------------------------------------------------------------------

    def system_reset(self) -> None:
        """A system reset as QEMU 8.2 does it to memory devices: every virtio-mem device
        unplugs all its memory (memslots unmapped, memory discarded and out of reach, usable
        region shrunk; while the device is busy, as during migration, nothing changes, as in
        QEMU). DIMMs, backends and vhost back-ends stay. The guest side (transports, drivers,
        the vCPU) is the caller's: :meth:`memslots.machine.vm.GuestVm.system_reset`."""
        for dev in self._virtio_mem:
            dev.system_reset()

    # -- queries -------------------------------------------------------------------------------

    @property
    def vhost_user_devices(self) -> list[VhostUserDevice]:
        """All vhost-user devices, in the order they were attached."""
        return [*self.vhost_devices.values(), *self._anon_vhost]

    @property
    def memory_devices(self) -> list[MemoryDevice]:
        """All memory devices, by address."""
        devs = list(self.devices.values()) + self._anon_devices
        return sorted(devs, key=lambda d: d.get_addr())

    @property
    def virtio_mem_devices(self) -> list[VirtioMem]:
        """The virtio-mem devices, by address."""
        return sorted(self._virtio_mem, key=lambda d: d.get_addr())

    def virtio_mem(self, dev_id: str) -> VirtioMem:
        """The virtio-mem device with this id."""
        dev = next((d for d in self._virtio_mem if d.id == dev_id), None)
        if dev is None:
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
        if not dev.memslot_plan().dynamic:
            return single, single
        return single, sum(slot_metadata_bytes(m.gpa, m.size, self.mmu) for m in dev.memslot_map())

    def close(self) -> None:
        """Tell vhost back-ends, close the VM (freeing its memslots), release host memory."""
        self._release(abandon=False)

    def _release(self, *, abandon: bool) -> None:
        # A machine that could not be built abandons its backends: files created or grown for
        # them are left as they were (a device refusing its backend must not change the file).
        for vdev in [
            *getattr(self, "vhost_devices", {}).values(),
            *getattr(self, "_anon_vhost", []),
        ]:
            vdev.detach()
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        for backend in list(getattr(self, "backends", {}).values()):
            if abandon:
                backend.abandon()
            else:
                backend.close()
        boot = getattr(self, "boot_ram", None)
        if boot is not None:
            boot.close()
