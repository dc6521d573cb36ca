"""vhost back-ends as memslot consumers: what every back-end reports, a model of one, and the set
of them the machine consults.

QEMU's rules (``hw/virtio/vhost.c``): vhost-kernel counts every RAM section; vhost-user counts only
sections whose memory has a file descriptor (anonymous RAM is invisible to it). The machine
asks the :class:`VhostSet` for the minimum limit and the minimum free count over all back-ends,
or ``UINT_MAX`` for both when there is none.

A back-end joins a machine through :func:`attach_vhost_backend`, which applies QEMU's two
``vhost_dev_init`` checks in QEMU's order around registering the back-end as a listener, and
only then :meth:`~VhostBackend.start`\\ s it: like QEMU, a back-end is sent its memory table only
once it has been accepted, so a refused back-end never sees more regions than it supports.
vhost-kernel is in :mod:`memslots.vhost.kernel`, vhost-user in :mod:`memslots.vhost.user`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memslots.errors import VhostError, VhostLimitError
from memslots.memory.address_space import Section
from memslots.memory.consumer import UINT_MAX, MemslotConsumer

if TYPE_CHECKING:
    from memslots.devices.memory_device import DeviceMemory
    from memslots.machine.machine import Machine

VHOST_KINDS = ("kernel", "user")


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
