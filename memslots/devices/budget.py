"""The memslot budget: every rule about how many memslots memory devices may use, in one place.

KVM and every vhost back-end spend one memslot (one vhost region) per RAM section they map, and
each has a limit. They only report facts (:class:`~memslots.memory.consumer.MemslotConsumer`:
``max``, ``used``, ``free = max - used``, and whether a section costs them one). This module
owns them and decides, as QEMU 8.2 does (``qemu-behaviour.md`` §2, §3, §5):

* the limits: :data:`SOFT_MEMSLOT_LIMIT` (256, what all memory devices together may ask for) and
  :data:`SAFE_MAX_MEMSLOTS` (509: below it in KVM or any vhost back-end, auto-deciding devices
  get one memslot);
* the automatic decision: :meth:`MemslotBudget.decision_limit`, QEMU's
  ``memory_device_memslot_decision_limit``;
* pre-plug's refusals, "hypervisor has not enough free memory slots left" and "a used vhost
  backend has not enough free memory slots left" (:meth:`MemslotBudget.check_addable`), and
  the warning when a fixed ``memslot-size`` takes memory devices past :data:`SOFT_MEMSLOT_LIMIT`;
* ``vhost_dev_init``'s two refusals of a back-end, around registering it
  (:meth:`MemslotBudget.attach_vhost`);
* how a vhost back-end is charged for memslots that memory devices reserved: an
  :class:`Accounting` per back-end, QEMU's (:class:`QemuAccounting`, the default) or the opt-in
  precise one (:class:`PreciseAccounting`, ``memslot-accounting=precise``).

Firecracker's ``vstate`` is the model: the budget owns the slots' consumers and devices ask it.
The counters it reads (required, used, reserved memslots; space) are the memory-device layer's
(:class:`~memslots.devices.device_memory.DeviceMemory`).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from memslots.devices.memory_device import MemoryDevice
from memslots.errors import NotEnoughMemslotsError, VhostLimitError
from memslots.memory.address_space import AddressSpace
from memslots.memory.consumer import MemslotConsumer
from memslots.vhost.backend import VhostBackend

log = logging.getLogger("memslots.devices.budget")

#: Soft cap on the memslots all memory devices together ask for (the old DIMM limit).
SOFT_MEMSLOT_LIMIT = 256
#: Below this many memslots in KVM or any vhost back-end, auto-deciding devices get 1.
SAFE_MAX_MEMSLOTS = 509
#: What QEMU's vhost stubs report for max and free when there is no vhost back-end.
UINT_MAX = (1 << 32) - 1


class DeviceMemoryState(Protocol):
    """The memory-device layer's counters the budget reads (QEMU's ``DeviceMemoryState``)."""

    @property
    def required_memslots(self) -> int:
        """Memslots plugged memory devices asked for."""
        ...

    @property
    def used_memslots(self) -> int:
        """Memslots memory devices map now."""
        ...

    @property
    def reserved_memslots(self) -> int:
        """``required - used`` (never negative): promised, not mapped yet."""
        ...

    @property
    def auto_decision(self) -> bool:
        """True while a device that auto-decided on more than one memslot is plugged."""
        ...

    @property
    def total_space(self) -> int:
        """Space for memory devices in total (``maxmem - ram``)."""
        ...

    @property
    def used_region_size(self) -> int:
        """Space plugged memory devices take."""
        ...

    @property
    def devices(self) -> Sequence[MemoryDevice]:
        """The plugged memory devices."""
        ...


# -- accounting strategies -------------------------------------------------------------------


class Accounting(ABC):
    """How a vhost back-end is charged for the memslots memory devices have reserved."""

    #: The ``memslot-accounting`` value that selects it.
    name: ClassVar[str]
    #: How refusals name it.
    title: ClassVar[str]
    #: Whether the back-end takes part in QEMU's "fewer than 509 memslots" rules.
    safe_limit_applies: ClassVar[bool]

    @abstractmethod
    def charged_reserved(self, devices: DeviceMemoryState | None) -> int:
        """Reserved memslots the back-end must be able to take."""


class QemuAccounting(Accounting):
    """QEMU's: every back-end is charged every reserved memslot and obeys the 509 rules."""

    name = "qemu"
    title = "QEMU's accounting"
    safe_limit_applies = True

    def charged_reserved(self, devices: DeviceMemoryState | None) -> int:
        """All reserved memslots."""
        return devices.reserved_memslots if devices is not None else 0


class PreciseAccounting(Accounting):
    """Beyond QEMU (opt-in): a back-end is charged only for what it will really map.

    vhost-user maps only fd-backed memory, so a back-end is charged the memslots reserved by
    devices whose memory has an fd (``required - mapped`` per device); it takes no part in the
    509 rules and bounds the decision by its exact free count instead. So dynamic memslots work
    beside Debian's 32-region back-ends and the limit is never exceeded. Trade-offs (see
    docs/DESIGN.md): decisions differ from QEMU's for the same command line; one device may
    take every free region; the memory-device layer asks one free count for any device, so a
    device without an fd is still bounded by this back-end's free regions when it decides.
    """

    name = "precise"
    title = "precise accounting"
    safe_limit_applies = False

    def charged_reserved(self, devices: DeviceMemoryState | None) -> int:
        """Reserved memslots of devices with fd-backed memory."""
        if devices is None:
            return 0
        total = 0
        for dev in devices.devices:
            # A device that does not say is charged, as QEMU charges every device.
            if dev.get_memory_region() is None or not dev.fd_backed:
                continue
            total += max(0, dev.get_memslots() - dev.mapped_memslots)
        return total


ACCOUNTINGS: dict[str, Accounting] = {a.name: a for a in (QemuAccounting(), PreciseAccounting())}


def accounting(name: str) -> Accounting:
    """The accounting strategy ``memslot-accounting=NAME`` selects."""
    return ACCOUNTINGS[name]


# -- the budget ---------------------------------------------------------------------------------


@dataclass
class VhostMember:
    """A vhost back-end in the budget and how it is charged."""

    backend: VhostBackend
    accounting: Accounting


def _c_double_to_uint(value: float) -> int:
    """What x86-64 C code gets from ``(unsigned int)double``: truncation, 32-bit wrap.

    Out-of-range values (inf from a division by zero, or beyond 2^63) convert to the
    "integer indefinite" 2^63 whose low 32 bits are 0.
    """
    if not math.isfinite(value) or value >= 2.0**63:
        return 0
    return int(value) & 0xFFFFFFFF


class MemslotBudget:
    """The memslots of one machine: who spends them, and every rule about who may.

    ``kvm`` is None where KVM is not consulted (QEMU consults it only with ``kvm_enabled()``).
    Vhost back-ends join with :meth:`attach_vhost` (QEMU's checks) or :meth:`add_vhost` (none,
    for describing a host); the budget registers them with ``address_space`` as listeners.
    ``device_memory`` is set by the memory-device layer when the machine has device memory.
    """

    def __init__(self, address_space: AddressSpace, kvm: MemslotConsumer | None) -> None:
        self.address_space = address_space
        self.kvm = kvm
        self.device_memory: DeviceMemoryState | None = None
        self._vhost: list[VhostMember] = []
        #: Warnings about accepted plugs (also logged), for reports such as ``plan --json``.
        self.warnings: list[str] = []

    # -- members ---------------------------------------------------------------------------------

    @property
    def vhost_backends(self) -> list[VhostBackend]:
        """The vhost back-ends, in the order they joined."""
        return [m.backend for m in self._vhost]

    @property
    def consumers(self) -> list[MemslotConsumer]:
        """KVM (if consulted) and every vhost back-end."""
        kvm: list[MemslotConsumer] = [self.kvm] if self.kvm is not None else []
        return [*kvm, *self.vhost_backends]

    def accounting_of(self, backend: VhostBackend) -> Accounting:
        """How ``backend`` is charged."""
        return next(m.accounting for m in self._vhost if m.backend is backend)

    def add_vhost(self, backend: VhostBackend, how: Accounting | None = None) -> None:
        """Register a back-end as a listener and a member, without QEMU's checks."""
        self.address_space.register(backend)
        self._vhost.append(VhostMember(backend, how if how is not None else QemuAccounting()))

    def remove_vhost(self, backend: VhostBackend) -> None:
        """Unregister a back-end (it is sent nothing more)."""
        self.address_space.unregister(backend)
        self._vhost = [m for m in self._vhost if m.backend is not backend]

    def attach_vhost(self, backend: VhostBackend, how: Accounting | None = None) -> None:
        """Add a vhost back-end the way QEMU's ``vhost_dev_init`` does.

        Order: the limit check, registration (the back-end learns the current memory map but is
        sent nothing), the reservation check, then :meth:`~VhostBackend.start`, which sends the
        table. Like QEMU, a back-end is sent its memory table only once it has been accepted,
        so a refused back-end never sees more regions than it supports. On any failure the
        back-end is detached and closed again.
        """
        how = how if how is not None else QemuAccounting()
        try:
            self.check_vhost_limit(backend, how)
            self.add_vhost(backend, how)
        except BaseException:
            backend.close()
            raise
        try:
            self.check_vhost_reservations(backend)
            backend.start()
        except BaseException:
            self.detach_vhost(backend)
            raise

    def detach_vhost(self, backend: VhostBackend) -> None:
        """Remove an attached back-end and close it (nothing is sent to it)."""
        backend.stop()
        self.remove_vhost(backend)
        backend.close()

    # -- what the memory-device layer promised ----------------------------------------------------

    @property
    def reserved_memslots(self) -> int:
        """QEMU's ``memory_devices_get_reserved_memslots``: 0 without device memory."""
        dm = self.device_memory
        return dm.reserved_memslots if dm is not None else 0

    @property
    def auto_decision(self) -> bool:
        """QEMU's ``memory_devices_memslot_auto_decision_active``."""
        dm = self.device_memory
        return dm.auto_decision if dm is not None else False

    # -- QEMU's questions -------------------------------------------------------------------------

    def decision_free(self, member: VhostMember) -> int:
        """A back-end's free count as the memory-device layer sees it.

        The layer subtracts every reserved memslot from it; a back-end charged fewer (precise
        accounting) gets the difference back. With QEMU's accounting this is ``free``.
        """
        reserved = self.reserved_memslots
        charged = member.accounting.charged_reserved(self.device_memory)
        return member.backend.free_memslots + max(0, reserved - charged)

    def vhost_max_memslots(self) -> int:
        """QEMU's ``vhost_get_max_memslots``: the minimum limit over the back-ends the 509 rules
        apply to, or UINT_MAX when there is none."""
        return min(
            (m.backend.max_memslots for m in self._vhost if m.accounting.safe_limit_applies),
            default=UINT_MAX,
        )

    def vhost_free_memslots(self) -> int:
        """QEMU's ``vhost_get_free_memslots`` as the decision sees it (see :meth:`decision_free`),
        or UINT_MAX when there is no back-end.

        Each back-end counts its own regions, as QEMU 10.1 does (8.2 kept two global counters,
        which went wrong once a vhost device was unplugged)."""
        return min((self.decision_free(m) for m in self._vhost), default=UINT_MAX)

    def limits(self) -> tuple[int, int]:
        """``(max, free)`` over KVM (when consulted) and every vhost back-end."""
        max_slots = self.vhost_max_memslots()
        free = self.vhost_free_memslots()
        if self.kvm is not None:
            max_slots = min(max_slots, self.kvm.max_memslots)
            free = min(free, self.kvm.free_memslots)
        return max_slots, free

    def decision_limit(self, size: int) -> int:
        """How many memslots a device of ``size`` bytes may use (QEMU's
        ``memory_device_memslot_decision_limit``)."""
        dm = self.device_memory
        assert dm is not None, "memory devices need device memory"
        max_slots, free = self.limits()
        reserved = dm.reserved_memslots
        if max_slots < SAFE_MAX_MEMSLOTS:
            return 1
        if dm.required_memslots >= SOFT_MEMSLOT_LIMIT:
            return 1
        memslots = SOFT_MEMSLOT_LIMIT - dm.required_memslots
        # QEMU subtracts unsigned; free < reserved would wrap, and is caught here.
        if free < reserved:
            return 1
        memslots = min(memslots, free - reserved)
        if memslots < 1:
            return 1
        if size == dm.total_space:
            return memslots
        available = dm.total_space - dm.used_region_size
        ratio = float(memslots) * float(size) / float(available) if available else math.inf
        return max(1, _c_double_to_uint(ratio))

    def check_addable(self, dev: MemoryDevice, size: int) -> None:
        """Pre-plug's memslot part: decide the device's memslots (if it decides), then refuse
        what KVM or a vhost back-end could not take."""
        reserved = self.reserved_memslots
        if dev.decides_memslots:
            dev.decide_memslots(self.decision_limit(size))
        required = dev.get_memslots()
        kvm = self.kvm
        if kvm is not None and kvm.free_memslots < required + reserved:
            raise NotEnoughMemslotsError(
                "hypervisor has not enough free memory slots left: "
                f"device '{dev.label}' needs {required} memslot(s) and {reserved} more are "
                f"reserved by other memory devices, but KVM has only "
                f"{kvm.free_memslots} of {kvm.max_memslots} free",
                consumer="kvm",
                needed=required + reserved,
                free=kvm.free_memslots,
            )
        vhost_free = self.vhost_free_memslots()
        if vhost_free < required + reserved:
            tightest = min(self._vhost, key=self.decision_free).backend
            raise NotEnoughMemslotsError(
                "a used vhost backend has not enough free memory slots left: "
                f"device '{dev.label}' needs {required} memslot(s) and {reserved} more are "
                f"reserved by other memory devices, but vhost back-end '{tightest.name}' has "
                f"only {vhost_free} of {tightest.max_memslots} free",
                consumer=tightest.name,
                needed=required + reserved,
                free=vhost_free,
            )
        self._warn_past_soft_limit(dev, required)

    def _warn_past_soft_limit(self, dev: MemoryDevice, required: int) -> None:
        """QEMU's decision never takes memory devices past the soft limit; a fixed memslot size
        (our extension) may. It is allowed, since KVM and every vhost back-end were just
        checked for room, but said."""
        dm = self.device_memory
        total = (dm.required_memslots if dm is not None else 0) + required
        if total <= SOFT_MEMSLOT_LIMIT:
            return
        warning = (
            f"memory device '{dev.label}' uses {required} memslot(s): memory devices then use "
            f"{total}, more than the {SOFT_MEMSLOT_LIMIT} QEMU's decision gives them in total "
            "(KVM and every vhost back-end have room for them)"
        )
        self.warnings.append(warning)
        log.warning("%s", warning)

    def check_vhost_limit(self, backend: VhostBackend, how: Accounting) -> None:
        """``vhost_dev_init``'s first refusal, before the back-end is registered.

        A device that decided on several memslots assumed at least 509 everywhere; a back-end
        with fewer would break that promise. Back-ends outside the 509 rules (precise
        accounting) are checked by :meth:`check_vhost_reservations` alone.
        """
        if not how.safe_limit_applies or not self.auto_decision:
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

    def check_vhost_reservations(self, backend: VhostBackend) -> None:
        """``vhost_dev_init``'s second refusal, once the back-end is registered: its used
        regions plus the reserved memslots it is charged must fit its limit."""
        how = self.accounting_of(backend)
        used = backend.used_memslots
        reserved = how.charged_reserved(self.device_memory)
        if used + reserved > backend.max_memslots:
            raise VhostLimitError(
                f"vhost backend memory slots limit ({backend.max_memslots}) is less than current "
                f"number of used ({used}) and reserved ({reserved}) memory slots for memory "
                f"devices. (vhost back-end '{backend.name}', {how.title})",
                backend=backend.name,
                limit=backend.max_memslots,
            )
