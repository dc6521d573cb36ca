"""A machine with a guest: virtio-mem devices on a virtio transport, driven by the Linux model.

:class:`GuestVm` attaches to every virtio-mem device of a :class:`~memslots.machine.machine.Machine`
the device side of the virtio transport, a split virtqueue laid out in boot RAM, and a
:class:`~memslots.guest.linux.LinuxGuest` that talks to the device only through that queue and the
config space. The guest uses the memory it plugs — from a real vCPU where the machine runs on
the real kernel, otherwise through guest RAM — so memory that vanishes while plugged is caught.

A guest access to memory out of its reach (an unplugged block of a mapped memslot with
``unplugged-inaccessible=on``: KVM fails it, see :mod:`memslots.kvm.vcpu`; on the KVM model the
address space refuses it) stops the VM, as QEMU stops on an internal error: the fault is
identified (device, block), logged and counted, every guest driver stops, the vCPU stays where
it faulted, and :attr:`GuestVm.fault_listeners` are told (``memslots run`` turns that into the
runstate ``internal-error`` and the QMP event ``X_GUEST_MEMORY_FAULT``). Only
:meth:`GuestVm.system_reset` lets it run again.

Boot RAM layout used here: ``[0, 2 MiB)`` the probe vCPU's image, then per device a 64 KiB
queue area and a 4 KiB page with the request and response buffers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
from memslots.errors import (
    ConfigError,
    DeviceError,
    GuestMemoryFault,
    InaccessibleMemoryError,
    MemslotsError,
    MigrationError,
)
from memslots.guest.linux import Channel, GuestOptions, LinuxGuest, MemoryUser, RamUser
from memslots.guest.sched import Scheduler
from memslots.kvm.vcpu import STATE_VERSION as VCPU_STATE_VERSION
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
    """The guest driver's channel: one request at a time over the virtqueue (C1).

    Built, it negotiates with the device and sets the queue up; with ``queue_state`` (a
    migration destination) it takes over a queue that the source's driver set up, whose rings
    are already in guest memory.
    """

    def __init__(
        self,
        transport: VirtioMemTransport,
        memory: GuestMemory,
        area: int,
        *,
        queue_state: dict[str, object] | None = None,
    ) -> None:
        self.transport = transport
        self.memory = memory
        self.area = area
        self.req_gpa = area + QUEUE_AREA_SIZE - BUFFER_PAGE
        self.resp_gpa = self.req_gpa + 64
        size = QUEUE_AREA_SIZE - BUFFER_PAGE
        if queue_state is not None:
            self.queue = DriverQueue.restore(
                memory, area, size, queue_state, notify=transport.notify
            )
            return
        self.queue = DriverQueue(memory, area, size, num=128, notify=transport.notify)
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


@dataclass(frozen=True)
class GuestFault:
    """A guest access to memory out of its reach, identified: what the VM stopped on.

    ``address`` and ``size`` are the access (or the page the kernel named), ``access`` is
    "read", "write" or None if unknown, ``detected_by`` as in
    :class:`~memslots.errors.GuestMemoryFault`; ``device`` and ``block`` (its index) are the
    virtio-mem device and block that hold the address, None outside every device.
    """

    address: int
    size: int
    access: str | None
    detected_by: str
    device: VirtioMem | None = None
    block: int | None = None

    @property
    def block_address(self) -> int | None:
        """Guest-physical address of the block, if the fault is inside a device."""
        if self.device is None or self.block is None:
            return None
        return self.device.addr + self.block * self.device.block_size


def _model_fault(
    exc: InaccessibleMemoryError, gpa: int, size: int, access: str
) -> GuestMemoryFault:
    """The fault a guest CPU on the KVM model takes where the address space refused it."""
    return GuestMemoryFault(
        f"guest memory fault: a {access} at gpa {gpa:#x} reached memory out of reach: {exc}",
        gpa=gpa,
        size=size,
        access=access,
        detected_by="model",
    )


class FaultWatch:
    """A :class:`MemoryUser` that reports the guest's memory faults to its VM (which stops)
    before the guest sees them."""

    def __init__(self, inner: MemoryUser, on_fault: Callable[[GuestMemoryFault], object]) -> None:
        self.inner = inner
        self.on_fault = on_fault

    def write_pattern(self, gpa: int, length: int, seed: int) -> None:
        """Pass through; a fault stops the VM and is raised."""
        try:
            self.inner.write_pattern(gpa, length, seed)
        except GuestMemoryFault as exc:
            self.on_fault(exc)
            raise
        except InaccessibleMemoryError as exc:
            fault = _model_fault(exc, gpa, length, "write")
            self.on_fault(fault)
            raise fault from exc

    def check_pattern(self, gpa: int, length: int, seed: int) -> bool:
        """Pass through; a fault stops the VM and is raised."""
        try:
            return self.inner.check_pattern(gpa, length, seed)
        except GuestMemoryFault as exc:
            self.on_fault(exc)
            raise
        except InaccessibleMemoryError as exc:
            fault = _model_fault(exc, gpa, length, "read")
            self.on_fault(fault)
            raise fault from exc


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


def boot_memory_end(machine: Machine) -> int:
    """Where the guest's boot memory ends (its Linux picks the memory block size from it)."""
    lay = machine.layout
    return lay.above_4g_end if lay.above_4g else lay.below_4g


#: Version of the STATE sections a guest VM saves (``guest/<device id>``).
GUEST_STATE_VERSION = 1
VCPU_SECTION = "vcpu/0"
GUEST_SECTION = "guest/"


class GuestVm(Closing):
    """A machine, its virtio-mem devices on virtqueues, and a Linux guest driving them.

    ``states`` and ``virtio`` (what :meth:`save_state` gave on a migration source, after the
    machine itself was loaded) resume the source's guest instead of booting a new one: the
    probe vCPU with its registers, each device's transport and queue, each driver where it
    stopped. A section that does not fit this machine raises
    :class:`~memslots.errors.MigrationError`.
    """

    def __init__(
        self,
        machine: Machine,
        sched: Scheduler | None = None,
        *,
        guest_options: GuestOptions | None = None,
        vcpu: bool | None = None,
        use_memory: bool = True,
        states: Mapping[str, tuple[int, bytes]] | None = None,
        virtio: Mapping[str, bytes] | None = None,
    ) -> None:
        self.machine = machine
        self.sched = sched or Scheduler()
        self.memory = GuestMemory(machine.address_space)
        opts = guest_options or GuestOptions(boot_memory_end=0)
        if not opts.boot_memory_end:
            opts = dataclasses.replace(opts, boot_memory_end=boot_memory_end(machine))
        self.guest_options = opts
        self.use_memory = use_memory
        use_vcpu = use_memory and (machine.vm.is_real if vcpu is None else vcpu)
        self.vcpu: ProbeVcpu | None = None
        if use_vcpu:
            from memslots.kvm.vm import KvmVm

            if not isinstance(machine.vm, KvmVm):
                raise ConfigError("a vCPU needs the real kernel (-accel kvm)")
            saved = None if states is None else _state(states, VCPU_SECTION, VCPU_STATE_VERSION)
            self.vcpu = ProbeVcpu(machine.vm, self.memory, state=saved)
        self.guests: dict[str, LinuxGuest] = {}
        self.transports: dict[str, VirtioMemTransport] = {}
        self.channels: dict[str, VirtqueueChannel] = {}
        self._areas: dict[str, int] = {}
        #: False once the VM stopped (a guest memory fault), until :meth:`start`.
        self.running = True
        #: The fault the VM stopped on, until :meth:`system_reset`.
        self.fault: GuestFault | None = None
        #: Told every fault, after the VM stopped.
        self.fault_listeners: list[Callable[[GuestFault], None]] = []
        try:
            if states is None:
                for dev in machine.virtio_mem_devices:
                    self.attach(dev)
            else:
                self._resume(states, virtio or {})
        except BaseException:
            self.close()
            raise

    # -- migration -----------------------------------------------------------------------------

    def save_state(self) -> tuple[dict[str, tuple[int, bytes]], dict[str, bytes]]:
        """The guest as a migration carries it: STATE sections (name -> ``(version,
        bytes)``: ``vcpu/0``, and ``guest/<id>`` with each driver, its queue bookkeeping and
        where its queue lives) and each device's virtio state by device id. Save it with the
        guest stopped (no request in flight)."""
        states: dict[str, tuple[int, bytes]] = {}
        if self.vcpu is not None:
            states[VCPU_SECTION] = (VCPU_STATE_VERSION, self.vcpu.save_state())
        virtio: dict[str, bytes] = {}
        for dev_id, guest in self.guests.items():
            channel = self.channels[dev_id]
            state = {
                "area": channel.area,
                "queue": channel.queue.save_state(),
                "driver": guest.save_state(),
            }
            states[GUEST_SECTION + dev_id] = (
                GUEST_STATE_VERSION,
                json.dumps(state, sort_keys=True).encode(),
            )
            virtio[dev_id] = self.transports[dev_id].save_state()
        return states, virtio

    def _resume(self, states: Mapping[str, tuple[int, bytes]], virtio: Mapping[str, bytes]) -> None:
        known = {VCPU_SECTION} if self.vcpu is not None else set()
        for dev in self.machine.virtio_mem_devices:
            if dev.id is None:
                raise ConfigError("a virtio-mem device needs an id to get a guest driver")
            name = GUEST_SECTION + dev.id
            known.add(name)
            raw = _state(states, name, GUEST_STATE_VERSION)
            try:
                state = json.loads(raw)
                area = int(state["area"])
                transport = VirtioMemTransport(dev, self.memory)
                self.transports[dev.id] = transport
                transport.load_state(virtio.get(dev.id, b""))
                channel = VirtqueueChannel(transport, self.memory, area, queue_state=state["queue"])
                guest = LinuxGuest.restore(
                    channel, self.sched, state["driver"], memory=self._user()
                )
            except MigrationError:
                raise
            except (ValueError, TypeError, KeyError, MemslotsError) as exc:
                raise MigrationError(f"STATE section '{name}' is malformed: {exc!r}") from None
            transport.config_interrupt = guest.config_interrupt
            self.channels[dev.id] = channel
            self.guests[dev.id] = guest
            self._areas[dev.id] = area
        extra = sorted(set(states) - known)
        if extra:
            raise MigrationError(_UNKNOWN_STATE.format(extra[0]))

    def fill(self, dev_id: str, size: int) -> int:
        """Put data into up to ``size`` bytes of the guest's usable memory of ``dev_id``, unit
        by unit (units that hold no pattern of the guest's own), as a guest whose memory is in
        use; returns the bytes written. The VMM writes it through guest memory, so the pages
        are its writes (the probe vCPU, a word per command, would take hours for GiBs)."""
        guest = self.guests.get(dev_id)
        if guest is None:
            raise ConfigError(f"no guest driver for device '{dev_id}'")
        block = os.urandom(8 * MiB)
        done = 0
        for gpa in guest.unpatterned_units():
            n = min(guest.unit, size - done)
            if n <= 0:
                break
            start = (gpa // guest.unit * 4096) % (len(block) - n + 1)
            self.memory.write(gpa, block[start : start + n])
            done += n
        return done

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """Guest-physical ranges the VMM writes through raw views of guest memory (the queue
        areas: rings, requests and responses), which neither KVM's dirty log nor the memory's
        write hook sees: a migration resends them in every pass."""
        return sorted((area, QUEUE_AREA_SIZE) for area in self._areas.values())

    def _user(self) -> MemoryUser | None:
        if not self.use_memory:
            return None
        inner = VcpuUser(self.vcpu) if self.vcpu is not None else RamUser(self.memory)
        return FaultWatch(inner, self.guest_fault)

    # -- the guest's own accesses ----------------------------------------------------------------

    def guest_access(self, gpa: int, *, write: bool, value: int = 0) -> int | None:
        """The guest's CPU reads (or writes ``value`` to) the byte at ``gpa``, as a guest that
        ignores the protocol might: from the vCPU on the real kernel, else through the
        address space. Returns the byte read (0 for a write), or None if nothing is there
        (MMIO). Memory out of reach stops the VM (:meth:`guest_fault`) and raises
        :class:`~memslots.errors.GuestMemoryFault`; a stopped VM refuses with
        :class:`~memslots.errors.DeviceError`."""
        if not self.running:
            raise DeviceError("the guest is not running: its VM stopped")
        if not 0 <= value <= 0xFF:
            raise ValueError(f"value {value:#x} does not fit in a byte")
        try:
            if self.vcpu is not None:
                if write:
                    return 0 if self.vcpu.write8(gpa, value) else None
                return self.vcpu.read8(gpa)
            if self.memory.address_space.find(gpa) is None:
                return None
            if write:
                self.memory.write(gpa, bytes((value,)))
                return 0
            return self.memory.read(gpa, 1)[0]
        except GuestMemoryFault as exc:
            self.guest_fault(exc)
            raise
        except InaccessibleMemoryError as exc:
            fault = _model_fault(exc, gpa, 1, "write" if write else "read")
            self.guest_fault(fault)
            raise fault from exc

    def guest_fault(self, exc: GuestMemoryFault) -> GuestFault:
        """Stop the VM on a guest memory fault: identify the device and block, log and count
        it, stop every guest driver (the vCPU stays where it faulted), tell the listeners."""
        device = block = None
        for dev in self.machine.virtio_mem_devices:
            block = dev.block_at(exc.gpa)
            if block is not None:
                device = dev
                dev.guest_faults += 1
                break
        fault = GuestFault(exc.gpa, exc.size, exc.access, exc.detected_by, device, block)
        where = "no memory device"
        if device is not None and block is not None:
            state = "plugged" if device.bitmap[block] else "unplugged"
            where = f"{state} block 0x{fault.block_address:x} of virtio-mem '{device.label}'"
        log.error(
            "guest %s of %d byte(s) at 0x%x hit memory out of its reach in %s (detected by %s): "
            "the VM stops until a system reset",
            exc.access or "access",
            exc.size,
            exc.gpa,
            where,
            exc.detected_by,
        )
        self.stop()
        self.fault = fault
        for cb in list(self.fault_listeners):
            cb(fault)
        return fault

    # -- run state -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the VM: every guest driver stops (a later :meth:`start` boots new ones)."""
        self.running = False
        for guest in self.guests.values():
            guest.stop()

    def start(self) -> None:
        """Run the VM again (QMP ``cont``): each device gets a fresh driver, as after a boot.
        Refused with :class:`~memslots.errors.DeviceError` while a fault needs a reset."""
        if self.fault is not None:
            raise DeviceError("Resetting the Virtual Machine is required")
        if self.running:
            return
        self.running = True
        for dev_id in list(self.transports):
            self._start_driver(dev_id)

    def system_reset(self) -> None:
        """A system reset (QMP ``system_reset``): the guests' drivers go away, the machine
        unplugs all virtio-mem memory (:meth:`Machine.system_reset`), the vCPU starts over,
        every transport is reset as the bus resets its devices (block states untouched), and in
        a running VM each device gets a fresh driver that negotiates and probes it, as after a
        reboot (a stopped VM's get theirs at :meth:`start`). Clears the fault."""
        for guest in self.guests.values():
            guest.stop()
        self.machine.system_reset()
        if self.vcpu is not None:
            self.vcpu.reset()
        self.fault = None
        for transport in self.transports.values():
            transport.reset()
        if self.running:
            for dev_id in list(self.transports):
                self._start_driver(dev_id)

    def attach(self, dev: VirtioMem) -> LinuxGuest | None:
        """Give ``dev`` a transport, a queue in boot RAM and a guest driver that probes it
        (None in a stopped VM: the driver comes with :meth:`start`)."""
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
        self.transports[dev.id] = transport
        self._areas[dev.id] = area
        try:
            return self._start_driver(dev.id) if self.running else None
        except BaseException:
            self.detach(dev.id)
            raise

    def _start_driver(self, dev_id: str) -> LinuxGuest:
        """A fresh driver on ``dev_id``'s transport: it negotiates, sets up its queue, probes."""
        transport = self.transports[dev_id]
        dev = transport.dev
        channel = VirtqueueChannel(transport, self.memory, self._areas[dev_id])
        stride = max(1, dev.region_size // (2 * MiB) // USE_BUDGET_BLOCKS)
        opts = dataclasses.replace(self.guest_options, use_stride=stride)
        guest = LinuxGuest(channel, self.sched, opts, memory=self._user())
        transport.config_interrupt = guest.config_interrupt
        self.channels[dev_id] = channel
        self.guests[dev_id] = guest
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

    def verify(self) -> dict[str, int]:
        """Every guest checks the pattern of each sub-block it uses, from inside the guest (the
        vCPU on the real kernel); returns how many each checked, by device id. What fails is
        added to that guest's ``violations``."""
        return {dev_id: guest.verify() for dev_id, guest in self.guests.items()}

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
        guest = self.guests.pop(dev_id, None)
        if guest is not None:
            guest.stop()
        self.channels.pop(dev_id, None)
        self._areas.pop(dev_id, None)

    def close(self) -> None:
        """Close the vCPU and detach the transports (the machine is the caller's)."""
        for t in self.transports.values():
            t.close()
        self.transports.clear()
        if self.vcpu is not None:
            self.vcpu.close()


_UNKNOWN_STATE = (
    "Unknown savevm section or instance '{}' 0. Make sure that your current VM setup matches "
    "your saved VM setup, including any hotplugged devices"
)


def _state(states: Mapping[str, tuple[int, bytes]], name: str, version: int) -> bytes:
    entry = states.get(name)
    if entry is None:
        raise MigrationError(
            f"the stream has no STATE section '{name}' (the source ran another guest: the "
            "destination needs the source's -guest and -accel)"
        )
    got, data = entry
    if got != version:
        raise MigrationError(
            f"STATE section '{name}' has version {got}, this build reads version {version}"
        )
    return data
