"""The one exception hierarchy of memslots.

Every error the package raises derives from :class:`MemslotsError`. Messages name the object
(device id, backend id, memslot) and the limit that was hit, so that a user can act on them.
"""

from __future__ import annotations


class MemslotsError(Exception):
    """Root of all memslots errors."""


class OptionError(MemslotsError):
    """A command-line option or option string is malformed or has a bad value."""


class SizeError(OptionError):
    """A size string ("4G", "512M", bytes) could not be parsed or is out of range."""


class ConfigError(MemslotsError):
    """A device or backend property is invalid at realize time (QEMU's realize errors)."""


class PropertyError(ConfigError):
    """A property could not be set (bad value, read-only, or not changeable any more)."""


class HostMemoryError(MemslotsError):
    """A host memory backend could not be created, mapped, or discarded."""


class KvmError(MemslotsError):
    """A KVM ioctl (real or modelled) failed; ``errno`` holds the kernel's error number."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` is missing or cannot be opened."""


class VcpuError(KvmError):
    """The probe vCPU failed: a guest exception, an unexpected exit, or a full page-table pool.

    For a guest exception, ``vector``, ``error_code`` (None if the vector pushes none),
    ``rip`` and ``cr2`` describe it; they are None for other failures.
    """

    def __init__(
        self,
        message: str,
        errno: int = 0,
        *,
        vector: int | None = None,
        error_code: int | None = None,
        rip: int | None = None,
        cr2: int | None = None,
    ) -> None:
        super().__init__(message, errno)
        self.vector = vector
        self.error_code = error_code
        self.rip = rip
        self.cr2 = cr2


class AddressSpaceError(MemslotsError):
    """A region could not be added to or removed from an address space."""


class MemoryDeviceError(MemslotsError):
    """The memory-device layer refused to plug or unplug a device (QEMU's pre_plug errors)."""


class NotEnoughMemslotsError(MemoryDeviceError):
    """A memslot consumer (KVM or a vhost back-end) has too few free memslots for a device."""

    def __init__(self, message: str, *, consumer: str, needed: int, free: int) -> None:
        super().__init__(message)
        self.consumer = consumer
        self.needed = needed
        self.free = free


class DeviceError(MemslotsError):
    """A device operation failed (for example a request on a device that needs reset)."""


class VhostError(MemslotsError):
    """A vhost back-end refused a device, or the vhost-user protocol failed."""


class VhostDisconnectedError(VhostError):
    """The vhost-user back-end closed the connection or died."""


class VhostLimitError(VhostError):
    """A vhost back-end's memory slot limit is too low for the memory devices (QEMU's
    ``vhost_dev_init`` refusals). ``hint`` is QEMU's hint, verbatim, if it gives one."""

    def __init__(self, message: str, *, backend: str, limit: int, hint: str | None = None):
        super().__init__(message if hint is None else f"{message}\n{hint.rstrip()}")
        self.backend = backend
        self.limit = limit
        self.hint = hint


class MeasurementError(MemslotsError):
    """A kernel measurement could not be taken (for example ``/proc/meminfo`` unreadable)."""


class MigrationError(MemslotsError):
    """A migration stream could not be written or loaded: a short or corrupt stream, a
    configuration that does not match the source's (QEMU's messages), or a destination that
    cannot take the state (for example a memslot it cannot map)."""
