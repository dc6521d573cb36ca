"""vhost back-ends as memslot consumers, the set of them the machine consults, and QEMU's
refusals of a vhost back-end whose memory slot limit is too low.

QEMU's rules (``hw/virtio/vhost.c``): vhost-kernel counts every RAM section; vhost-user counts only
sections whose memory has a file descriptor (anonymous RAM is invisible to it). The machine
asks the :class:`VhostSet` for the minimum limit and the minimum free count over all back-ends,
or ``UINT_MAX`` for both when there is none.

A back-end joins a machine through :func:`attach_vhost_backend`, which applies QEMU's two
``vhost_dev_init`` checks in QEMU's order around registering the back-end as a listener, and
only then :meth:`~VhostBackend.start`\\ s it: like QEMU, a back-end is sent its memory table only
once it has been accepted, so a refused back-end never sees more regions than it supports.

vhost-kernel here is :class:`VhostKernelConsumer` over ``/dev/vhost-net`` (:class:`VhostNet`)
where the host has it, else over :class:`VhostKernelModel`, which enforces the kernel's
``max_mem_regions`` with the kernel's errno. The vhost-user consumer lives in
:mod:`memslots.vhost.user`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from memslots.errors import VhostError, VhostLimitError
from memslots.memory.address_space import Section
from memslots.memory.consumer import UINT_MAX, MemslotConsumer

if TYPE_CHECKING:
    from memslots.devices.memory_device import DeviceMemory
    from memslots.machine.machine import Machine

log = logging.getLogger("memslots.vhost.kernel")

VHOST_KINDS = ("kernel", "user")

#: The vhost module parameter QEMU reads for vhost-kernel's limit.
MAX_MEM_REGIONS_PATH = "/sys/module/vhost/parameters/max_mem_regions"
#: QEMU's (and the module's) default when the parameter can't be read or parsed.
VHOST_KERNEL_DEFAULT_LIMIT = 64
VHOST_NET_PATH = "/dev/vhost-net"

# <linux/vhost.h>: VHOST_VIRTIO = 0xAF; _IO(0xAF, 0x01) and _IOW(0xAF, 0x03, struct vhost_memory),
# where sizeof(struct vhost_memory) is 8 (nregions, padding, then a flexible array).
VHOST_SET_OWNER = 0xAF01
VHOST_SET_MEM_TABLE = 0x4008AF03
_VHOST_MEMORY = struct.Struct("<II")
_VHOST_MEMORY_REGION = struct.Struct("<QQQQ")


class VhostBackend(MemslotConsumer):
    """A vhost back-end as the memory-device layer sees it.

    ``precise`` back-ends (vhost-user's opt-in mode, see
    :class:`memslots.vhost.user.VhostUserConsumer`) are charged only for what they really map:
    they take no part in QEMU's "fewer than 509 memslots" rules and are bounded by their free
    count instead.
    """

    kind: str
    precise: bool = False

    def charged_reserved(self, device_memory: DeviceMemory) -> int:
        """Memslots memory devices have reserved that this back-end must be able to take.

        QEMU charges every back-end for every reserved memslot.
        """
        return device_memory.reserved_memslots

    def start(self) -> None:
        """The back-end was accepted: from now on it gets (and is limited to) its memory table."""

    def stop(self) -> None:
        """The back-end is going away: stop sending it changes."""

    def close(self) -> None:
        """Release the back-end (device fd, connection)."""


class VhostModel(VhostBackend):
    """A vhost back-end known only by its kind and limit (used by ``memslots plan``).

    ``other_used`` counts regions the back-end already holds for memory outside our machine
    model, so that "free when the first memory device is plugged" can be described exactly.
    """

    def __init__(self, name: str, limit: int, *, kind: str = "kernel", other_used: int = 0) -> None:
        if kind not in VHOST_KINDS:
            raise VhostError(f"vhost back-end '{name}': kind must be one of {VHOST_KINDS}")
        self.name = name
        self.kind = kind
        self.limit = limit
        self.other_used = other_used
        self._regions: set[Section] = set()

    @property
    def max_memslots(self) -> int:
        return self.limit

    @property
    def used_memslots(self) -> int:
        return len(self._regions) + self.other_used

    def accepts(self, section: Section) -> bool:
        # vhost-user back-ends can only map memory they get a file descriptor for.
        return self.kind == "kernel" or section.backend.fd_backed

    def region_add(self, section: Section) -> None:
        if not self.accepts(section):
            return
        if self.used_memslots >= self.limit:
            raise VhostError(
                f"vhost back-end '{self.name}': no free memory region for '{section.name}': "
                f"all {self.limit} are in use"
            )
        self._regions.add(section)

    def region_del(self, section: Section) -> None:
        self._regions.discard(section)


def _precise(backend: MemslotConsumer) -> bool:
    return isinstance(backend, VhostBackend) and backend.precise


class VhostSet:
    """All vhost back-ends of a machine; answers QEMU's ``vhost_get_{max,free}_memslots``."""

    def __init__(self) -> None:
        self.backends: list[MemslotConsumer] = []

    def add(self, backend: MemslotConsumer) -> None:
        """Register a back-end (the caller also registers it with the address space)."""
        self.backends.append(backend)

    def remove(self, backend: MemslotConsumer) -> None:
        """Forget a back-end."""
        self.backends.remove(backend)

    def max_memslots(self) -> int:
        """Minimum limit over back-ends with QEMU's accounting, or UINT_MAX when there is none.

        Back-ends in precise accounting are left out: the decision is bounded by their free
        count instead, which counts exactly what they will have to map.
        """
        return min((b.max_memslots for b in self.backends if not _precise(b)), default=UINT_MAX)

    def free_memslots(self) -> int:
        """Minimum free count over all back-ends, or UINT_MAX when there is none."""
        return min((b.free_memslots for b in self.backends), default=UINT_MAX)


# -- QEMU's vhost_dev_init refusals ----------------------------------------------------------


def check_vhost_limit(device_memory: DeviceMemory | None, backend: VhostBackend) -> None:
    """QEMU's first refusal, before the back-end is registered as a memory listener.

    A device that decided on several memslots assumed at least 509 everywhere; a back-end
    with fewer would break that promise. Precise back-ends are checked by
    :func:`check_vhost_reservations` alone.
    """
    # memory_device imports this module, so its constant is looked up at call time.
    from memslots.devices.memory_device import SAFE_MAX_MEMSLOTS

    if backend.precise or device_memory is None or not device_memory.auto_decision:
        return
    if backend.max_memslots < SAFE_MAX_MEMSLOTS:
        raise VhostLimitError(
            "some memory device (like virtio-mem) decided how many memory slots to use based "
            "on the overall number of memory slots; this vhost backend would further restricts "
            f"the overall number of memory slots: vhost back-end '{backend.name}' supports "
            f"{backend.max_memslots} memory slots, fewer than {SAFE_MAX_MEMSLOTS}",
            backend=backend.name,
            limit=backend.max_memslots,
            hint="Try plugging this vhost backend before plugging such memory devices.\n",
        )


def check_vhost_reservations(device_memory: DeviceMemory | None, backend: VhostBackend) -> None:
    """QEMU's second refusal, once the back-end is registered: its used regions plus the
    memslots memory devices have reserved must fit its limit."""
    used = backend.used_memslots
    reserved = backend.charged_reserved(device_memory) if device_memory is not None else 0
    if used + reserved > backend.max_memslots:
        accounting = "precise accounting" if backend.precise else "QEMU's accounting"
        raise VhostLimitError(
            f"vhost backend memory slots limit ({backend.max_memslots}) is less than current "
            f"number of used ({used}) and reserved ({reserved}) memory slots for memory "
            f"devices. (vhost back-end '{backend.name}', {accounting})",
            backend=backend.name,
            limit=backend.max_memslots,
        )


def attach_vhost_backend(machine: Machine, backend: VhostBackend) -> None:
    """Add a vhost back-end to a running machine the way QEMU's ``vhost_dev_init`` does.

    Order: the limit check, registration (the back-end learns the current memory map but is
    sent nothing), the reservation check, then :meth:`VhostBackend.start`, which sends the
    table. On any failure the back-end is detached and closed again.
    """
    try:
        check_vhost_limit(machine.device_memory, backend)
        machine.add_vhost(backend)
    except BaseException:
        backend.close()
        raise
    try:
        check_vhost_reservations(machine.device_memory, backend)
        backend.start()
    except BaseException:
        detach_vhost_backend(machine, backend)
        raise


def detach_vhost_backend(machine: Machine, backend: VhostBackend) -> None:
    """Remove an attached back-end from the machine and close it (nothing is sent to it)."""
    backend.stop()
    machine.address_space.unregister(backend)
    machine.vhost.remove(backend)
    backend.close()


# -- vhost-kernel ------------------------------------------------------------------------------

_STRTOULL_DEC = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")


def parse_max_mem_regions(text: str) -> int | None:
    """The vhost module's ``max_mem_regions`` as QEMU reads it; None if QEMU would ignore it.

    QEMU parses with ``strtoull`` in base 10 (leading blanks and a sign allowed, anything after
    the digits ignored, a minus sign negating modulo 2^64) and rejects no digits, 0 and
    overflow. The value then becomes QEMU's ``int`` limit, so it wraps to 32 bits as in C.
    """
    m = _STRTOULL_DEC.match(text)
    if m is None:
        return None
    value = int(m.group(2))
    if value == 0 or value >= 1 << 64:
        return None
    if m.group(1) == "-":
        value = -value & ((1 << 64) - 1)
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def vhost_kernel_memslots_limit(path: str = MAX_MEM_REGIONS_PATH) -> int:
    """vhost-kernel's memslot limit: the module parameter, else 64 (QEMU's rules).

    A missing or unreadable file silently gives 64; an invalid value gives 64 and QEMU's
    message on logger ``memslots.vhost.kernel``.
    """
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return VHOST_KERNEL_DEFAULT_LIMIT
    value = parse_max_mem_regions(text)
    if value is None:
        log.warning("ignoring invalid max_mem_regions value in vhost module: %s", text.rstrip())
        return VHOST_KERNEL_DEFAULT_LIMIT
    return value


@dataclass(frozen=True)
class KernelRegion:
    """One entry of a vhost-kernel memory table."""

    gpa: int
    size: int
    uaddr: int


def pack_vhost_memory(regions: Sequence[KernelRegion]) -> bytearray:
    """``struct vhost_memory`` with its regions, as VHOST_SET_MEM_TABLE takes it.

    A bytearray, because ``fcntl.ioctl`` only passes a mutable buffer through without the
    1024-byte copy limit.
    """
    buf = bytearray(_VHOST_MEMORY.pack(len(regions), 0))
    for r in regions:
        buf += _VHOST_MEMORY_REGION.pack(r.gpa, r.size, r.uaddr, 0)
    return buf


class VhostKernelDevice(Protocol):
    """What :class:`VhostKernelConsumer` needs from a vhost-kernel device: its memory table."""

    @property
    def is_real(self) -> bool:
        """True for a real ``/dev/vhost-*`` device."""
        ...

    def set_mem_table(self, regions: Sequence[KernelRegion]) -> None:
        """Replace the whole memory table; raise :class:`VhostError` (table unchanged) if not."""
        ...

    def close(self) -> None:
        """Release the device."""
        ...


class VhostNet:
    """The real ``/dev/vhost-net``: opened, owned (VHOST_SET_OWNER), given memory tables."""

    is_real = True

    def __init__(self, path: str = VHOST_NET_PATH) -> None:
        try:
            self.fd: int | None = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise VhostError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            fcntl.ioctl(self.fd, VHOST_SET_OWNER, 0)
        except OSError as exc:
            self.close()
            raise VhostError(f"{path}: VHOST_SET_OWNER failed: {exc.strerror}") from exc
        self.path = path

    def set_mem_table(self, regions: Sequence[KernelRegion]) -> None:
        """VHOST_SET_MEM_TABLE; the kernel refuses more than max_mem_regions with E2BIG."""
        if self.fd is None:
            raise VhostError(f"{self.path} is closed")
        try:
            fcntl.ioctl(self.fd, VHOST_SET_MEM_TABLE, pack_vhost_memory(regions), True)
        except OSError as exc:
            raise VhostError(
                f"{self.path}: VHOST_SET_MEM_TABLE with {len(regions)} regions failed: "
                f"{exc.strerror}"
            ) from exc

    def close(self) -> None:
        """Close the device; the kernel drops its memory table with it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class VhostKernelModel:
    """vhost-kernel's memory table rules without the device: at most ``max_mem_regions``
    regions (E2BIG beyond, as ``vhost_set_memory`` answers), regions must not be empty."""

    is_real = False

    def __init__(self, max_mem_regions: int) -> None:
        self.max_mem_regions = max_mem_regions
        self.table: tuple[KernelRegion, ...] = ()
        self.calls = 0

    def set_mem_table(self, regions: Sequence[KernelRegion]) -> None:
        """Replace the table, or fail like the kernel without changing it."""
        if len(regions) > self.max_mem_regions:
            raise VhostError(
                f"vhost-kernel model: VHOST_SET_MEM_TABLE with {len(regions)} regions failed: "
                f"{os.strerror(errno.E2BIG)} (max_mem_regions is {self.max_mem_regions})"
            )
        if any(r.size == 0 for r in regions):
            raise VhostError(
                f"vhost-kernel model: VHOST_SET_MEM_TABLE failed: {os.strerror(errno.EINVAL)}"
            )
        self.table = tuple(regions)
        self.calls += 1

    def close(self) -> None:
        """Forget the table."""
        self.table = ()


def open_vhost_kernel(limit: int, path: str = VHOST_NET_PATH) -> VhostKernelDevice:
    """``/dev/vhost-net`` where the host has it, else the model with the same limit."""
    if os.path.exists(path):
        return VhostNet(path)
    return VhostKernelModel(limit)


class VhostKernelConsumer(VhostBackend):
    """A vhost-kernel back-end (QEMU's ``-netdev tap,vhost=on``): every RAM section costs a
    region, and the whole table is set at the end of each batch (VHOST_SET_MEM_TABLE).

    ``limit`` defaults to :func:`vhost_kernel_memslots_limit`; ``device`` to
    :func:`open_vhost_kernel`. Until :meth:`start` the table is only recorded.
    """

    kind = "kernel"

    def __init__(
        self, name: str, device: VhostKernelDevice | None = None, *, limit: int | None = None
    ) -> None:
        self.name = name
        self.limit = vhost_kernel_memslots_limit() if limit is None else limit
        self.device = device if device is not None else open_vhost_kernel(self.limit)
        self._table: dict[Section, KernelRegion] = {}
        self._started = False
        self._changed = False
        self._refused = False

    @property
    def max_memslots(self) -> int:
        return self.limit

    @property
    def used_memslots(self) -> int:
        return len(self._table) + self.other_used

    @property
    def table(self) -> list[KernelRegion]:
        """The memory table, sorted by guest-physical address."""
        return sorted(self._table.values(), key=lambda r: r.gpa)

    def region_add(self, section: Section) -> None:
        if self._started and self.used_memslots >= self.limit:
            # Refusing here makes the address space undo the batch: the guest's request gets
            # BUSY instead of the kernel failing the whole table.
            self._refused = True
            raise VhostError(
                f"vhost back-end '{self.name}': no free memory region for '{section.name}' at "
                f"0x{section.gpa:x}: all {self.limit} are in use"
            )
        self._table[section] = KernelRegion(section.gpa, section.size, section.host_addr)
        self._changed = True

    def region_del(self, section: Section) -> None:
        del self._table[section]
        self._changed = True

    def commit(self) -> None:
        refused, self._refused = self._refused, False
        # After a refusal the address space replays the old view; set the table then.
        if self._started and self._changed and not refused:
            self.device.set_mem_table(self.table)
            self._changed = False

    def start(self) -> None:
        """Set the current table and keep it up to date from now on."""
        self._started = True
        self.device.set_mem_table(self.table)
        self._changed = False

    def stop(self) -> None:
        """Stop setting tables."""
        self._started = False

    def close(self) -> None:
        """Close the device."""
        self._started = False
        self.device.close()
