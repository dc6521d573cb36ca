"""The one exception hierarchy of memslots, and the one table of exit statuses.

Every error the package raises derives from :class:`MemslotsError`. Messages name the object
(device id, backend id, memslot) and the limit that was hit, so that a user can act on them.
Each class carries the process exit status it ends a command with (``exit_code``), from
:data:`EXIT_CODES`; the command line has one handler that prints ``memslots: <message>`` and
exits with it (see :mod:`memslots.cli.main`).
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
#: Bad input, or a configuration QEMU would refuse (the command line's usage errors too).
EXIT_BAD_INPUT = 1
#: Something missing on the host: /dev/kvm, or an optional component a command needs.
EXIT_HOST_MISSING = 2
#: A timeout: ``resize --wait`` did not get there, or a QMP server did not answer in time.
EXIT_TIMEOUT = 3

#: The exit statuses of every command, as ``--help`` and the README list them.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_BAD_INPUT: "bad input, or a configuration QEMU would refuse (usage errors too)",
    EXIT_HOST_MISSING: "something missing on the host (/dev/kvm, matplotlib for --plots)",
    EXIT_TIMEOUT: "a timeout (resize --wait, a QMP server that does not answer)",
}


class MemslotsError(Exception):
    """Root of all memslots errors; ends a command with :data:`EXIT_BAD_INPUT` unless a
    subclass says otherwise."""

    exit_code: ClassVar[int] = EXIT_BAD_INPUT


class HostMissingError(MemslotsError):
    """Something the command needs is missing on the host (/dev/kvm, an optional package)."""

    exit_code = EXIT_HOST_MISSING


class MemslotsTimeoutError(MemslotsError):
    """Something did not happen in time (a resize, a QMP server's answer)."""

    exit_code = EXIT_TIMEOUT


class MonitorError(MemslotsError):
    """A QMP server refused a command, or the connection to it failed or was lost."""


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


class KvmUnavailableError(KvmError, HostMissingError):
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
    cannot take the state (for example a memslot it cannot map).

    Bad input, as QEMU refuses such an incoming migration: :data:`EXIT_BAD_INPUT`.
    """

    exit_code = EXIT_BAD_INPUT
