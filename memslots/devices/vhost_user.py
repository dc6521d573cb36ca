"""vhost-user devices: ``-device vhost-user-blk|fs[-pci]`` attached through ``-chardev socket``.

Their options are :mod:`memslots.options.vhost_user`'s. Attaching follows QEMU's realize: the
chardev is looked up (by the machine), the back-end is connected and negotiated, QEMU's two
memory slot refusals run around registering the back-end as a memory listener
(:meth:`memslots.devices.budget.MemslotBudget.attach_vhost`), and for vhost-user-blk the config
space is read. What matters here is the memory table; for vhost-user-blk there is also just
enough of one virtqueue (:class:`BlkQueue`) to READ from the disk into guest memory.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time

from memslots.devices.budget import MemslotBudget, accounting
from memslots.errors import VhostError
from memslots.memory.address_space import GuestMemory
from memslots.options.vhost_user import ChardevOptions, VhostUserDeviceOptions
from memslots.vhost.user.consumer import ConnectionState, VhostUserConsumer
from memslots.vhost.user.frontend import Endpoint, VhostUserFrontend

#: sizeof(struct virtio_blk_config) as QEMU 7.2 reads it; the capacity is its first u64.
BLK_CONFIG_SIZE = 60
SECTOR_SIZE = 512


# -- virtio-blk over one split virtqueue -------------------------------------------------------

_DESC = struct.Struct("<QIHH")
_BLK_OUTHDR = struct.Struct("<IIQ")
_DESC_F_NEXT = 1
_DESC_F_WRITE = 2
_BLK_T_IN = 0


class BlkQueue:
    """Virtqueue 0 of a vhost-user-blk back-end, with us in the guest driver's place.

    Just enough of a split ring for one READ at a time. Everything lives in a 1 KiB ring area
    at ``ring_gpa`` (descriptors, avail and used rings, request header and status), which must
    be guest memory the back-end holds: the memslot it lies in has to stay mapped while the
    queue is in use, as a guest driver's rings do.
    """

    SIZE = 16
    DESC = 0x000
    AVAIL = 0x100
    USED = 0x200
    HEADER = 0x300
    STATUS = 0x310
    AREA = 0x400

    def __init__(self, frontend: VhostUserFrontend, memory: GuestMemory, ring_gpa: int) -> None:
        if ring_gpa % 16:
            raise VhostError(f"virtqueue ring area 0x{ring_gpa:x} is not 16-byte aligned")
        # Check first: the back-end reads the used ring as soon as it gets its address.
        frontend.translate(ring_gpa, self.AREA)
        self.frontend = frontend
        self.memory = memory
        self.ring_gpa = ring_gpa
        self.avail_idx = 0
        memory.write(ring_gpa, bytes(self.AREA))
        # Non-blocking: qemu-storage-daemon sets O_NONBLOCK on the fds it gets anyway.
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            frontend.set_vring(
                0,
                self.SIZE,
                (ring_gpa + self.DESC, ring_gpa + self.AVAIL, ring_gpa + self.USED),
                self.kick,
                self.call,
            )
        except BaseException:
            self.close()
            raise

    def _used_idx(self) -> int:
        idx: int = struct.unpack("<H", self.memory.read(self.ring_gpa + self.USED + 2, 2))[0]
        return idx

    def read(self, sector: int, gpa: int, length: int, timeout: float) -> int:
        """READ ``length`` bytes from ``sector`` into guest memory at ``gpa``; returns the
        used length the back-end reports (data + status byte)."""
        # A buffer outside the back-end's table would make it drop the connection; one in
        # memory out of the guest's reach (unplugged) the back-end would fill through its own
        # mapping, which our protection does not cover: refused here.
        self.frontend.translate(gpa, length)
        self.memory.ranges(gpa, length)
        ring, mem = self.ring_gpa, self.memory
        mem.write(ring + self.HEADER, _BLK_OUTHDR.pack(_BLK_T_IN, 0, sector))
        mem.write(ring + self.STATUS, b"\xff")
        chain = (
            (ring + self.HEADER, _BLK_OUTHDR.size, _DESC_F_NEXT, 1),
            (gpa, length, _DESC_F_NEXT | _DESC_F_WRITE, 2),
            (ring + self.STATUS, 1, _DESC_F_WRITE, 0),
        )
        mem.write(ring + self.DESC, b"".join(_DESC.pack(*d) for d in chain))
        slot = self.avail_idx % self.SIZE
        mem.write(ring + self.AVAIL + 4 + 2 * slot, struct.pack("<H", 0))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        # The index is published after the entry it covers, as a driver must.
        mem.write(ring + self.AVAIL + 2, struct.pack("<H", self.avail_idx))
        os.eventfd_write(self.kick, 1)
        deadline = time.monotonic() + timeout
        while self._used_idx() != self.avail_idx:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VhostError(
                    f"vhost-user-blk back-end at '{self.frontend.endpoint.path}' did not "
                    f"complete a READ of sector {sector} within {timeout} s"
                )
            if select.select([self.call], [], [], remaining)[0]:
                # Only the used index decides; the counter just needs draining.
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call)
        _, used_len = struct.unpack("<II", mem.read(ring + self.USED + 4 + 8 * slot, 8))
        status = mem.read(ring + self.STATUS, 1)[0]
        if status != 0:
            raise VhostError(
                f"vhost-user-blk READ of sector {sector} failed with virtio-blk status {status}"
            )
        return int(used_len)

    def close(self) -> None:
        """Close the eventfds (the back-end stops with the connection)."""
        os.close(self.kick)
        os.close(self.call)


# -- devices ---------------------------------------------------------------------------------


class VhostUserDevice:
    """A vhost-user device attached to a machine: its back-end and its connection state."""

    def __init__(
        self,
        budget: MemslotBudget,
        opts: VhostUserDeviceOptions,
        consumer: VhostUserConsumer,
        capacity: int | None,
    ) -> None:
        self.budget = budget
        self.opts = opts
        self.consumer = consumer
        #: vhost-user-blk: the disk size in 512-byte sectors (from the config space).
        self.capacity = capacity
        self._queue: BlkQueue | None = None

    @property
    def id(self) -> str | None:
        """The device id."""
        return self.opts.id

    @property
    def state(self) -> ConnectionState:
        """CONNECTED, DISCONNECTED (back-end lost; see :meth:`reconnect`) or CLOSED."""
        return self.consumer.state

    @property
    def attached(self) -> bool:
        """True until :meth:`detach` (the back-end is in the budget, connected or not)."""
        return self.consumer.state is not ConnectionState.CLOSED

    def check(self) -> ConnectionState:
        """Ask the back-end whether it is still there; returns the state."""
        return self.consumer.check()

    def reconnect(self) -> None:
        """Connect again and replay the memory table (virtqueues are set up again on use)."""
        self._drop_queue()
        self.consumer.reconnect()

    def blk_read(self, sector: int, gpa: int, length: int, *, ring_gpa: int) -> int:
        """vhost-user-blk: READ ``length`` bytes from ``sector`` into guest memory at ``gpa``.

        The virtqueue is set up at ``ring_gpa`` on first use (see :class:`BlkQueue`). Returns
        the used length; raises :class:`VhostError` if the back-end fails or does not answer.
        """
        if not self.opts.is_blk or self.capacity is None:
            raise VhostError(f"{self.opts.driver} '{self.consumer.name}' is not a block device")
        if length <= 0 or length % SECTOR_SIZE or sector + length // SECTOR_SIZE > self.capacity:
            raise VhostError(
                f"vhost-user-blk '{self.consumer.name}': READ of {length} bytes at sector "
                f"{sector} is outside the {self.capacity}-sector disk or not whole sectors"
            )
        frontend = self.consumer.frontend
        if not self.consumer.connected or frontend is None:
            raise VhostError(f"vhost-user-blk '{self.consumer.name}' is {self.state.value}")
        queue = self._queue
        if queue is None or queue.frontend is not frontend or queue.ring_gpa != ring_gpa:
            self._drop_queue()
            queue = self._queue = BlkQueue(
                frontend, GuestMemory(self.budget.address_space), ring_gpa
            )
        return queue.read(sector, gpa, length, self.consumer.endpoint.timeout)

    def _drop_queue(self) -> None:
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    def detach(self) -> None:
        """Unplug the device: it leaves the machine's memslot budget and is closed (once)."""
        self._drop_queue()
        if self.attached:
            self.budget.detach_vhost(self.consumer)


def attach_vhost_user_device(
    budget: MemslotBudget,
    opts: VhostUserDeviceOptions,
    chardev: ChardevOptions,
    name: str,
    *,
    planned_limit: int | None = None,
) -> VhostUserDevice:
    """Realize a vhost-user device in QEMU's order, once the machine found its chardev.

    The back-end is connected and negotiated; then the budget's refusals run around
    registering it (:meth:`~memslots.devices.budget.MemslotBudget.attach_vhost`), then the
    memory table is sent, and vhost-user-blk's config is read. Nothing remains on failure.
    With ``planned_limit`` (``memslots plan``) the back-end is only described, with that limit:
    the same refusals run, nothing is connected or sent.
    """
    consumer = VhostUserConsumer(
        name,
        Endpoint(chardev.path, config=opts.is_blk),
        chardev=opts.chardev,
        planned_limit=planned_limit,
    )
    budget.attach_vhost(consumer, accounting(opts.memslot_accounting))
    capacity = None
    if opts.is_blk and planned_limit is None:
        assert consumer.frontend is not None
        try:
            config = consumer.frontend.get_config(BLK_CONFIG_SIZE)
        except VhostError as exc:
            budget.detach_vhost(consumer)
            raise VhostError(f"vhost-user-blk '{name}': get block config failed: {exc}") from exc
        capacity = struct.unpack_from("<Q", config)[0]
    return VhostUserDevice(budget, opts, consumer, capacity)
