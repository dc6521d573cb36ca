"""User text in, frozen configuration out: the one seam between people and memslots.

Every parser of user text lives in this package, and nothing else turns text into values:

* :mod:`~memslots.options.grammar`: QEMU's ``key=value`` grammar and its typed values;
* :mod:`~memslots.options.machine`: ``-m``, ``-object memory-backend-*``, ``-device`` (memory
  devices), ``-accel`` and the whole :class:`MachineConfig`;
* :mod:`~memslots.options.vhost_user`: ``-chardev socket`` and vhost-user ``-device``;
* :mod:`~memslots.options.monitor`: ``-qmp``, and the client's QMP address and arguments;
* :mod:`~memslots.options.migration`: migration URIs (``-incoming``, ``migrate``);
* :mod:`~memslots.options.simulate`: resize traces, exposure strategies, pinned offsets.

QEMU's size grammar (``512M``, ``4G``) is :func:`memslots.sizes.parse_size`, a value type below
this layer; it is exported here too, so that front-ends take every parser from one place.

Each rule is checked once, with one error naming the option, the key and what is allowed. The
names below are the package's public interface.
"""

from memslots.options.grammar import (
    Props,
    decimal_integer,
    decimal_number,
    id_wellformed,
    split_option_string,
)
from memslots.options.machine import (
    ACCELS,
    BACKEND_TYPES,
    DEFAULT_RAM_SIZE,
    DIMM_DRIVERS,
    SUPPORTED_DEVICES,
    VIRTIO_MEM_DRIVERS,
    AccelOptions,
    BackendOptions,
    DeviceOptions,
    DimmOptions,
    MachineConfig,
    MachineMemory,
    VirtioMemOptions,
    backend_from_args,
    device_from_args,
    parse_accel,
    parse_any_device,
    parse_backend,
    parse_device,
    parse_machine_config,
    parse_machine_memory,
)
from memslots.options.migration import MigrationUri, parse_migration_uri
from memslots.options.monitor import (
    Address,
    QmpEndpoint,
    parse_address,
    parse_arguments,
    parse_qmp_option,
)
from memslots.options.simulate import (
    MAX_TRACE_SECONDS,
    TraceStep,
    first_virtio_mem,
    load_trace,
    parse_offsets,
    parse_strategies,
    parse_strategy,
    parse_trace,
    with_strategy,
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
from memslots.sizes import parse_size

__all__ = [
    "ACCELS",
    "BACKEND_TYPES",
    "DEFAULT_RAM_SIZE",
    "DIMM_DRIVERS",
    "FS_TAG_MAX",
    "MAX_TRACE_SECONDS",
    "MEMSLOT_ACCOUNTING",
    "SUPPORTED_DEVICES",
    "VHOST_USER_BLK_DRIVERS",
    "VHOST_USER_DRIVERS",
    "VHOST_USER_FS_DRIVERS",
    "VIRTIO_MEM_DRIVERS",
    "AccelOptions",
    "Address",
    "BackendOptions",
    "ChardevOptions",
    "DeviceOptions",
    "DimmOptions",
    "MachineConfig",
    "MachineMemory",
    "MigrationUri",
    "Props",
    "QmpEndpoint",
    "TraceStep",
    "VhostUserDeviceOptions",
    "VirtioMemOptions",
    "backend_from_args",
    "decimal_integer",
    "decimal_number",
    "device_from_args",
    "first_virtio_mem",
    "id_wellformed",
    "load_trace",
    "parse_accel",
    "parse_address",
    "parse_any_device",
    "parse_arguments",
    "parse_backend",
    "parse_chardev",
    "parse_device",
    "parse_machine_config",
    "parse_machine_memory",
    "parse_migration_uri",
    "parse_offsets",
    "parse_qmp_option",
    "parse_size",
    "parse_strategies",
    "parse_strategy",
    "parse_trace",
    "parse_vhost_user_device",
    "split_option_string",
    "vhost_user_device_from_args",
    "with_strategy",
]
