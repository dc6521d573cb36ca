"""A machine with a guest: virtio-mem devices on a virtio transport, driven by the Linux model.

:class:`GuestVm` attaches to every virtio-mem device of a :class:`~memslots.machine.machine.Machine`
the device side of the virtio transport, a split virtqueue laid out in boot RAM, and a
:class:`~memslots.guest.linux.LinuxGuest` that talks to the device only through that queue and the
config space. The guest uses the memory it plugs — from a real vCPU where the machine runs on
the real kernel, otherwise through guest RAM — so memory that vanishes while plugged is caught.

Boot RAM layout used here: ``[0, 2 MiB)`` the probe vCPU's image, then per device a 64 KiB
queue area and a 4 KiB page with the request and response buffers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from memslots.closing import Closing
from memslots.devices.virtio_mem.device import VirtioMem
from memslots.devices.virtio_mem.wire import (
    CONFIG_SIZE,
    F_UNPLUGGED_INACCESSIBLE,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    Config,
    ReqType,
    Request,
    Response,
)
from memslots.errors import ConfigError
from memslots.guest.linux import Channel, GuestOptions, LinuxGuest, MemoryUser, RamUser
from memslots.guest.sched import Scheduler
from memslots.kvm.vcpu import ProbeVcpu
from memslots.machine.machine import Machine
from memslots.machine.resize import ProgressCallback, ResizeJob
from memslots.memory.address_space import GuestMemory
from memslots.sizes import KiB, MiB
from memslots.virtio.transport import (
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioMemTransport,
)
from memslots.virtio.virtqueue import DriverQueue

log = logging.getLogger("memslots.machine.vm")

QUEUE_AREA_BASE = 2 * MiB
QUEUE_AREA_SIZE = 64 * KiB
BUFFER_PAGE = 4 * KiB
#: The guest writes into at most about this many sub-blocks per device (see GuestOptions).
USE_BUDGET_BLOCKS = 1024
#: Request names by wire value, as the latency statistics name them.
_REQUEST_NAMES = {int(t): t.name.lower() for t in ReqType}


class VirtqueueChannel:
    """The guest driver's channel: one request at a time over the virtqueue (C1)."""

    def __init__(self, transport: VirtioMemTransport, memory: GuestMemory, area: int) -> None:
        self.transport = transport
        self.memory = memory
        self.queue = DriverQueue(
            memory, area, QUEUE_AREA_SIZE - BUFFER_PAGE, num=128, notify=transport.notify
        )
        self.req_gpa = area + QUEUE_AREA_SIZE - BUFFER_PAGE
        self.resp_gpa = self.req_gpa + 64
        t = transport
        t.write_status(STATUS_ACKNOWLEDGE)
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        t.write_driver_features(
            t.device_features & (1 << F_VERSION_1 | 1 << F_UNPLUGGED_INACCESSIBLE)
        )
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        if not t.status & STATUS_FEATURES_OK:
            raise ConfigError(f"virtio-mem '{t.dev.label}' refused the driver's features")
        q = self.queue
        t.setup_queue(q.num, q.desc_gpa, q.avail_gpa, q.used_gpa)
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    def read_config(self) -> Config:
        """Read the config space consistently (retry while the generation moves)."""
        while True:
            gen = self.transport.config_generation
            raw = self.transport.read_config(0, CONFIG_SIZE)
            if gen == self.transport.config_generation:
                return Config.unpack(raw)

    def send(self, request: Request) -> Response | None:
        """Put the request in the queue, kick, and collect the response (None: no answer)."""
        self.memory.write(self.req_gpa, request.pack())
        self.memory.write(self.resp_gpa, bytes(RESPONSE_SIZE))
        self.queue.add([(self.req_gpa, REQUEST_SIZE)], [(self.resp_gpa, RESPONSE_SIZE)])
        self.queue.kick()
        used = self.queue.get_used()
        if used is None:
            return None
        return Response.unpack(self.memory.read(self.resp_gpa, RESPONSE_SIZE))


class ObservedChannel:
    """A channel that reports every request's round-trip time (for latency statistics)."""

    def __init__(self, inner: Channel, observe: Callable[[str, float], None]) -> None:
        self.inner = inner
        self.observe = observe

    def read_config(self) -> Config:
        """Pass through."""
        return self.inner.read_config()

    def send(self, request: Request) -> Response | None:
        """Send, then report ``(request type, seconds)``."""
        t0 = time.perf_counter()
        resp = self.inner.send(request)
        kind = _REQUEST_NAMES.get(request.type)
        if kind is not None:
            self.observe(kind, time.perf_counter() - t0)
        return resp


class CheckpointChannel:
    """A channel that calls ``checkpoint`` before each request: where a guest that runs in a
    thread of its own lets others at the machine (:meth:`memslots.machine.runner.MachineRunner.
    checkpoint`). Outermost, so that the wait there is no part of a request's latency."""

    def __init__(self, inner: Channel, checkpoint: Callable[[], None]) -> None:
        self.inner = inner
        self.checkpoint = checkpoint

    def read_config(self) -> Config:
        """Pass through."""
        return self.inner.read_config()

    def send(self, request: Request) -> Response | None:
        """Checkpoint, then send."""
        self.checkpoint()
        return self.inner.send(request)


class VcpuUser:
    """The guest touches its memory from a real vCPU (a :class:`MemoryUser`)."""

    def __init__(self, vcpu: ProbeVcpu) -> None:
        self.vcpu = vcpu

    def write_pattern(self, gpa: int, length: int, seed: int) -> None:
        """Write from inside the guest; an MMIO exit means the memory is not RAM."""
        if not self.vcpu.write_pattern(gpa, min(length, 2 * MiB), seed):
            raise ConfigError(f"guest write at 0x{gpa:x} came back as MMIO: no memslot there")

    def check_pattern(self, gpa: int, length: int, seed: int) -> bool:
        """Check from inside the guest."""
        return self.vcpu.check_pattern(gpa, min(length, 2 * MiB), seed)


class GuestVm(Closing):
    """A machine, its virtio-mem devices on virtqueues, and a Linux guest driving them."""

    def __init__(
        self,
        machine: Machine,
        sched: Scheduler | None = None,
        *,
        guest_options: GuestOptions | None = None,
        vcpu: bool | None = None,
        use_memory: bool = True,
    ) -> None:
        self.machine = machine
        self.sched = sched or Scheduler()
        self.memory = GuestMemory(machine.address_space)
        lay = machine.layout
        end = lay.above_4g_end if lay.above_4g else lay.below_4g
        opts = guest_options or GuestOptions(boot_memory_end=0)
        if not opts.boot_memory_end:
            opts = dataclasses.replace(opts, boot_memory_end=end)
        self.guest_options = opts
        self.use_memory = use_memory
        use_vcpu = use_memory and (machine.vm.is_real if vcpu is None else vcpu)
        self.vcpu: ProbeVcpu | None = None
        if use_vcpu:
            from memslots.kvm.vm import KvmVm

            if not isinstance(machine.vm, KvmVm):
                raise ConfigError("a vCPU needs the real kernel (-accel kvm)")
            self.vcpu = ProbeVcpu(machine.vm, self.memory)
        self.guests: dict[str, LinuxGuest] = {}
        self.transports: dict[str, VirtioMemTransport] = {}
        self.channels: dict[str, VirtqueueChannel] = {}
        self._areas: dict[str, int] = {}
        for dev in machine.virtio_mem_devices:
            self.attach(dev)

    def _user(self) -> MemoryUser | None:
        if not self.use_memory:
            return None
        return VcpuUser(self.vcpu) if self.vcpu is not None else RamUser(self.memory)

    def attach(self, dev: VirtioMem) -> LinuxGuest:
        """Give ``dev`` a transport, a queue in boot RAM and a guest driver; probe it."""
        if dev.id is None:
            raise ConfigError("a virtio-mem device needs an id to get a guest driver")
        # Queue areas are never shared: a detached device's area is reused only once freed.
        used = set(self._areas.values())
        area = next(
            QUEUE_AREA_BASE + i * QUEUE_AREA_SIZE
            for i in range(len(used) + 1)
            if QUEUE_AREA_BASE + i * QUEUE_AREA_SIZE not in used
        )
        if not self.memory.is_ram(area, QUEUE_AREA_SIZE):
            raise ConfigError(
                f"no room for the virtqueue of '{dev.id}' in boot RAM at 0x{area:x} "
                f"(boot RAM must reach 0x{area + QUEUE_AREA_SIZE:x})"
            )
        transport = VirtioMemTransport(dev, self.memory)
        channel = VirtqueueChannel(transport, self.memory, area)
        stride = max(1, dev.region_size // (2 * MiB) // USE_BUDGET_BLOCKS)
        opts = dataclasses.replace(self.guest_options, use_stride=stride)
        guest = LinuxGuest(channel, self.sched, opts, memory=self._user())
        transport.config_interrupt = guest.config_interrupt
        self.transports[dev.id] = transport
        self.channels[dev.id] = channel
        self.guests[dev.id] = guest
        self._areas[dev.id] = area
        guest.probe()
        return guest

    def attach_new(self) -> list[str]:
        """Attach a guest driver to every virtio-mem device that has none yet (after a
        hot-plug); returns their ids."""
        new = [dev for dev in self.machine.virtio_mem_devices if dev not in self.devices]
        for dev in new:
            self.attach(dev)  # refuses a device without an id: no guest could drive it
        return [dev.id for dev in new if dev.id is not None]

    @property
    def devices(self) -> list[VirtioMem]:
        """The devices that have a guest driver."""
        return [t.dev for t in self.transports.values()]

    def settle(self, seconds: float = 1.0) -> None:
        """Let the guests work for ``seconds`` of scheduler time."""
        self.sched.advance(seconds)

    def resize(
        self, dev_id: str, size: int, *, on_progress: ProgressCallback | None = None
    ) -> ResizeJob:
        """Start resizing ``dev_id`` to ``size``; wait on the returned job."""
        dev = self.machine.virtio_mem(dev_id)
        return ResizeJob(dev, size, self.sched, self.guests.get(dev_id), on_progress=on_progress)

    def detach(self, dev_id: str) -> None:
        """Forget the guest driver of a device that was unplugged."""
        transport = self.transports.pop(dev_id, None)
        if transport is not None:
            transport.close()
        self.guests.pop(dev_id, None)
        self.channels.pop(dev_id, None)
        self._areas.pop(dev_id, None)

    def close(self) -> None:
        """Close the vCPU and detach the transports (the machine is the caller's)."""
        for t in self.transports.values():
            t.close()
        if self.vcpu is not None:
            self.vcpu.close()
