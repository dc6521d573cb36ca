"""The machine's options: ``-m``, ``-object memory-backend-*``, ``-device``, ``-accel`` and the
whole command line as a :class:`MachineConfig`.

``-m 4G,slots=N,maxmem=1028G``, ``-object memory-backend-ram,id=mem0,size=1T,reserve=off`` and
``-device virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on`` become frozen dataclasses. Every
rule that can be checked without a machine is checked here, one error per rule, and each error
names the option, the key and the allowed values. Rules that need the machine (sizes against
backends, memslot budgets) are checked at realize time by the devices themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memslots.errors import OptionError, SizeError
from memslots.options.grammar import Props, args_pairs, describe_args, split_option_string
from memslots.options.vhost_user import (
    VHOST_USER_DRIVERS,
    ChardevOptions,
    VhostUserDeviceOptions,
    parse_chardev,
    parse_vhost_user_device,
)
from memslots.sizes import MiB, align_up, format_size, parse_ram_size

# ---------------------------------------------------------------------------------------------
# -m


@dataclass(frozen=True)
class MachineMemory:
    """``-m size=…,slots=…,maxmem=…``: boot RAM, DIMM slots and the maximum memory."""

    ram_size: int
    maxmem: int
    slots: int = 0

    @property
    def device_memory_size(self) -> int:
        """Total space for memory devices: ``maxmem - ram`` (0 means no device memory)."""
        return self.maxmem - self.ram_size


DEFAULT_RAM_SIZE = 128 * MiB


def _sizes(maxmem: int, ram: int) -> str:
    # QEMU's hex, repeated for people after its text.
    return f"maxmem {format_size(maxmem)}, RAM {format_size(ram)}"


def parse_machine_memory(text: str) -> MachineMemory:
    """Parse ``-m``: a bare size means MiB; maxmem must not be below the RAM size."""
    props = Props("-m", text, split_option_string(text, "size"))
    raw = props.pop_str("size", "128M") or "128M"
    try:
        # QEMU: a size of 0 means the default; RAM is rounded up to 8 KiB.
        ram = align_up(parse_ram_size(raw), 8192) or DEFAULT_RAM_SIZE
    except SizeError as exc:
        raise OptionError(f"-m {text}: {exc}") from exc
    has_slots = "slots" in props.values
    has_maxmem = "maxmem" in props.values
    maxmem = props.pop_size("maxmem", ram)
    slots = props.pop_number("slots", 0)
    props.finish(("size", "slots", "maxmem"))
    assert maxmem is not None
    if has_slots and not has_maxmem:
        raise OptionError(f"-m {text}: slots specified but no max-size")
    if maxmem < ram:
        raise OptionError(
            f"-m {text}: invalid value of maxmem: maximum memory size (0x{maxmem:x}) must be at "
            f"least the initial memory size (0x{ram:x}) ({_sizes(maxmem, ram)})"
        )
    if slots and maxmem == ram:
        raise OptionError(
            f"-m {text}: invalid value of maxmem: memory slots were specified but maximum "
            f"memory size (0x{maxmem:x}) is equal to the initial memory size (0x{ram:x}) "
            f"({_sizes(maxmem, ram)})"
        )
    return MachineMemory(ram_size=ram, maxmem=maxmem, slots=slots)


# ---------------------------------------------------------------------------------------------
# -object memory-backend-*

BACKEND_TYPES = ("memory-backend-ram", "memory-backend-memfd", "memory-backend-file")


@dataclass(frozen=True)
class BackendOptions:
    """One ``-object memory-backend-*``. ``share`` defaults as in QEMU (memfd: on, else off)."""

    qom_type: str
    id: str
    size: int
    share: bool
    reserve: bool = True
    prealloc: bool = False
    mem_path: str | None = None
    hugetlb: bool = False
    hugetlbsize: int | None = None
    seal: bool = True


def parse_backend(text: str) -> BackendOptions:
    """Parse ``-object memory-backend-{ram,memfd,file},id=…,size=…[,…]``."""
    return _backend(Props("-object", text, split_option_string(text, "qom-type")))


def backend_from_args(args: dict[str, object], where: str = "object-add") -> BackendOptions:
    """The same rules for QMP ``object-add`` arguments (JSON numbers, booleans, strings)."""
    return _backend(Props(where, describe_args(args), args_pairs(args, where)))


def device_from_args(args: dict[str, object], where: str = "device_add") -> DeviceOptions:
    """The same rules for QMP ``device_add`` arguments."""
    return _device(Props(where, describe_args(args), args_pairs(args, where)))


def _backend(props: Props) -> BackendOptions:
    qom_type = props.require_str("qom-type")
    if qom_type not in BACKEND_TYPES:
        raise OptionError(
            f"{props.where()}: unsupported object type '{qom_type}' "
            f"(supported: {', '.join(BACKEND_TYPES)})"
        )
    obj_id = props.pop_id(required=True)
    assert obj_id is not None
    size = props.pop_size("size")
    if size is None:
        raise OptionError(f"{props.where()}: parameter 'size' is missing")
    if size == 0:
        raise OptionError(f"{props.where()}: property 'size' of {obj_id} must not be zero")
    share = props.pop_bool("share", qom_type == "memory-backend-memfd")
    reserve = props.pop_bool("reserve", True)
    prealloc = props.pop_bool("prealloc", False)
    allowed = ["qom-type", "id", "size", "share", "reserve", "prealloc"]
    mem_path = hugetlbsize = None
    hugetlb = False
    seal = True
    if qom_type == "memory-backend-file":
        mem_path = props.require_str("mem-path")
        allowed.append("mem-path")
    if qom_type == "memory-backend-memfd":
        hugetlb = props.pop_bool("hugetlb", False)
        hugetlbsize = props.pop_size("hugetlbsize")
        seal = props.pop_bool("seal", True)
        allowed += ["hugetlb", "hugetlbsize", "seal"]
        if hugetlbsize is not None and not hugetlb:
            raise OptionError(f"{props.where()}: 'hugetlbsize' needs 'hugetlb=on'")
    props.finish(allowed)
    if not reserve and prealloc:
        raise OptionError(
            f"{props.where()}: 'prealloc=on' and 'reserve=off' are incompatible for {obj_id}"
        )
    return BackendOptions(
        qom_type=qom_type,
        id=obj_id,
        size=size,
        share=share,
        reserve=reserve,
        prealloc=prealloc,
        mem_path=mem_path,
        hugetlb=hugetlb,
        hugetlbsize=hugetlbsize,
        seal=seal,
    )


# ---------------------------------------------------------------------------------------------
# -device

VIRTIO_MEM_DRIVERS = ("virtio-mem", "virtio-mem-pci")
DIMM_DRIVERS = ("pc-dimm",)


@dataclass(frozen=True)
class VirtioMemOptions:
    """``-device virtio-mem[-pci],…``. ``block_size`` None means the computed default.

    ``memslot_size`` is our extension (Firecracker-style fixed memslot size); None means QEMU's
    behaviour selected by ``dynamic_memslots``.
    """

    id: str | None
    memdev: str | None
    requested_size: int = 0
    block_size: int | None = None
    dynamic_memslots: bool = False
    unplugged_inaccessible: str = "on"
    memaddr: int = 0
    node: int = 0
    prealloc: bool = False
    memslot_size: int | None = None
    driver: str = "virtio-mem"


@dataclass(frozen=True)
class DimmOptions:
    """``-device pc-dimm,id=…,memdev=…[,addr=…][,node=…]``."""

    id: str | None
    memdev: str | None
    addr: int = 0
    node: int = 0
    driver: str = "pc-dimm"
    #: The ACPI slot; None lets the machine pick the first free one.
    slot: int | None = None


DeviceOptions = VirtioMemOptions | DimmOptions

SUPPORTED_DEVICES = VIRTIO_MEM_DRIVERS + DIMM_DRIVERS


def parse_device(text: str) -> DeviceOptions:
    """Parse ``-device DRIVER,…`` for the memory devices memslots knows."""
    return _device(Props("-device", text, split_option_string(text, "driver")))


def parse_any_device(text: str) -> DeviceOptions | VhostUserDeviceOptions:
    """Parse ``-device``: a memory device, or a vhost-user device (blk, fs)."""
    pairs = split_option_string(text, "driver")
    if dict(pairs).get("driver") in VHOST_USER_DRIVERS:
        return parse_vhost_user_device(text)
    return parse_device(text)


def _device(props: Props) -> DeviceOptions:
    driver = props.require_str("driver")
    dev_id = props.pop_id()
    memdev = props.pop_str("memdev")
    if driver in VIRTIO_MEM_DRIVERS:
        requested = props.pop_size("requested-size", 0)
        block = props.pop_size("block-size")
        dynamic = props.pop_bool("dynamic-memslots", False)
        inaccessible = props.pop_choice("unplugged-inaccessible", ("on", "off", "auto"), "on")
        memaddr = props.pop_u64("memaddr", 0)
        node = props.pop_uint32("node", 0)
        prealloc = props.pop_bool("prealloc", False)
        memslot_size = props.pop_size("memslot-size")
        props.finish(
            (
                "id",
                "memdev",
                "requested-size",
                "block-size",
                "dynamic-memslots",
                "unplugged-inaccessible",
                "memaddr",
                "node",
                "prealloc",
                "memslot-size",
            )
        )
        assert requested is not None and memaddr is not None
        return VirtioMemOptions(
            id=dev_id,
            memdev=memdev,
            requested_size=requested,
            block_size=block,
            dynamic_memslots=dynamic,
            unplugged_inaccessible=inaccessible,
            memaddr=memaddr,
            node=node,
            prealloc=prealloc,
            memslot_size=memslot_size,
            driver=driver,
        )
    if driver in DIMM_DRIVERS:
        addr = props.pop_u64("addr", 0)
        node = props.pop_uint32("node", 0)
        slot = props.pop_int32("slot", -1)
        props.finish(("id", "memdev", "addr", "node", "slot"))
        return DimmOptions(
            id=dev_id,
            memdev=memdev,
            addr=addr,
            node=node,
            driver=driver,
            slot=None if slot < 0 else slot,
        )
    raise OptionError(
        f"{props.where()}: unsupported device '{driver}' "
        f"(supported: {', '.join(SUPPORTED_DEVICES)})"
    )


# ---------------------------------------------------------------------------------------------
# -accel

ACCELS = ("auto", "kvm", "sim")


@dataclass(frozen=True)
class AccelOptions:
    """``-accel NAME[,slot-zap-all=on|off]``: the real kernel (``kvm``), the model (``sim``) or
    whichever is there (``auto``).

    ``slot_zap_all`` keeps KVM's KVM_X86_QUIRK_SLOT_ZAP_ALL (every memslot delete zaps all of
    the VM's shadow pages). Off by default: the quirk is disabled where the kernel offers that,
    so a delete only zaps the slot's own mappings. The model honours it the same way.
    """

    name: str = "auto"
    slot_zap_all: bool = False


def parse_accel(text: str) -> AccelOptions:
    """Parse ``-accel``: a name, then its properties."""
    props = Props("-accel", text, split_option_string(text, "accel"))
    name = props.require_str("accel")
    if name not in ACCELS:
        raise OptionError(f"-accel {text}: expects one of {', '.join(ACCELS)}")
    slot_zap_all = props.pop_bool("slot-zap-all", False)
    props.finish(("slot-zap-all",))
    return AccelOptions(name=name, slot_zap_all=slot_zap_all)


@dataclass(frozen=True)
class MachineConfig:
    """Everything the command line describes: memory, backends, devices in plug order.

    ``accel`` is the accelerator's name; ``slot_zap_all`` its property (see AccelOptions).
    """

    memory: MachineMemory
    backends: tuple[BackendOptions, ...] = ()
    devices: tuple[DeviceOptions | VhostUserDeviceOptions, ...] = ()
    accel: str = "auto"
    chardevs: tuple[ChardevOptions, ...] = ()
    slot_zap_all: bool = False

    def virtio_mem_options(self, dev_id: str) -> VirtioMemOptions:
        """The ``-device virtio-mem`` with this id."""
        for d in self.devices:
            if isinstance(d, VirtioMemOptions) and d.id == dev_id:
                return d
        raise OptionError(f"no virtio-mem device with id '{dev_id}'")


def parse_machine_config(
    memory: str | None,
    objects: Sequence[str] = (),
    devices: Sequence[str] = (),
    accel: str = "auto",
    chardevs: Sequence[str] = (),
) -> MachineConfig:
    """Parse a whole command line's memory options; ids must be unique across the machine.

    ``accel`` is ``-accel``'s text (``kvm``, ``sim,slot-zap-all=on``, ...).
    """
    accel_opts = parse_accel(accel)
    mem = parse_machine_memory(memory if memory is not None else "128M")
    backends = tuple(parse_backend(o) for o in objects)
    devs = tuple(parse_any_device(d) for d in devices)
    chars = tuple(parse_chardev(c) for c in chardevs)
    char_ids: set[str] = set()
    for char in chars:
        if char.id in char_ids:
            raise OptionError(f"-chardev socket,id={char.id}: duplicate chardev id '{char.id}'")
        char_ids.add(char.id)
    seen: set[str] = set()
    for obj in backends:
        if obj.id in seen:
            raise OptionError(f"-object {obj.qom_type}: attempt to add duplicate id '{obj.id}'")
        seen.add(obj.id)
    dev_ids: set[str] = set()
    for dev in devs:
        if dev.id is not None:
            if dev.id in dev_ids:
                raise OptionError(f"-device {dev.driver}: duplicate ID '{dev.id}' for device")
            dev_ids.add(dev.id)
    return MachineConfig(
        memory=mem,
        backends=backends,
        devices=devs,
        accel=accel_opts.name,
        chardevs=chars,
        slot_zap_all=accel_opts.slot_zap_all,
    )
