"""User text in, frozen configuration out: the one seam between people and memslots.

Every parser of user text lives in this package, and nothing else turns text into values:

* :mod:`~memslots.options.grammar`: QEMU's ``key=value`` grammar and its typed values;
* :mod:`~memslots.options.machine`: ``-m``, ``-object memory-backend-*``, ``-device`` (memory
  devices) and the whole :class:`MachineConfig`;
* :mod:`~memslots.options.vhost_user`: ``-chardev socket`` and vhost-user ``-device``.

Each rule is checked once, with one error naming the option, the key and what is allowed. The
names below are the package's public interface.
"""

from memslots.options.grammar import Props, id_wellformed, split_option_string
from memslots.options.machine import (
    ACCELS,
    BACKEND_TYPES,
    DEFAULT_RAM_SIZE,
    DIMM_DRIVERS,
    SUPPORTED_DEVICES,
    VIRTIO_MEM_DRIVERS,
    BackendOptions,
    DeviceOptions,
    DimmOptions,
    MachineConfig,
    MachineMemory,
    VirtioMemOptions,
    backend_from_args,
    device_from_args,
    parse_any_device,
    parse_backend,
    parse_device,
    parse_machine_config,
    parse_machine_memory,
)
from memslots.options.vhost_user import (
    FS_TAG_MAX,
    MEMSLOT_ACCOUNTING,
    VHOST_USER_BLK_DRIVERS,
    VHOST_USER_DRIVERS,
    VHOST_USER_FS_DRIVERS,
    ChardevOptions,
    VhostUserDeviceOptions,
    parse_chardev,
    parse_vhost_user_device,
    vhost_user_device_from_args,
)

__all__ = [
    "ACCELS",
    "BACKEND_TYPES",
    "DEFAULT_RAM_SIZE",
    "DIMM_DRIVERS",
    "FS_TAG_MAX",
    "MEMSLOT_ACCOUNTING",
    "SUPPORTED_DEVICES",
    "VHOST_USER_BLK_DRIVERS",
    "VHOST_USER_DRIVERS",
    "VHOST_USER_FS_DRIVERS",
    "VIRTIO_MEM_DRIVERS",
    "BackendOptions",
    "ChardevOptions",
    "DeviceOptions",
    "DimmOptions",
    "MachineConfig",
    "MachineMemory",
    "Props",
    "VhostUserDeviceOptions",
    "VirtioMemOptions",
    "backend_from_args",
    "device_from_args",
    "id_wellformed",
    "parse_any_device",
    "parse_backend",
    "parse_chardev",
    "parse_device",
    "parse_machine_config",
    "parse_machine_memory",
    "parse_vhost_user_device",
    "split_option_string",
    "vhost_user_device_from_args",
]
