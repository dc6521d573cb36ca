"""Machines and checks that tests of several layers share."""

from __future__ import annotations

import os

from backends import memfd_mappings

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.devices.virtio_mem.wire import Config, Request, Response
from memslots.guest.linux import GuestOptions, LinuxGuest
from memslots.guest.sched import Scheduler
from memslots.host.memory import HostMemory
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.options import parse_device, parse_machine_config
from memslots.vhost.user.consumer import VhostUserConsumer
from memslots.vhost.user.wire import MemRegion


def check_invariants(m: Machine, dev: VirtioMem) -> None:
    """The device's bitmap, sizes and memslot map agree with each other and with the machine
    (and, on the real kernel, with the kernel's own slot table); with
    ``unplugged-inaccessible=on`` exactly the unplugged blocks are out of reach."""
    assert dev.size == dev.nb_plugged_blocks * dev.block_size
    memory = dev.memdev.memory if dev.memdev is not None else None
    if isinstance(memory, HostMemory):
        bs = dev.block_size
        assert not any(memory.inaccessible(f * bs, n * bs) for f, n in dev.plugged_ranges())
        # Nothing plugged is protected, so this many protected bytes are the unplugged ones.
        assert memory.protected_bytes == (dev.region_size - dev.size if dev.protects else 0)
    assert dev.usable_region_size >= dev.requested_size or dev.requested_size == 0
    assert dev.size <= dev.region_size
    mapped_gpas = {s.gpa for s in m.address_space.sections}
    for slot in dev.memslot_map():
        first = (slot.gpa - dev.addr) // dev.block_size
        plugged = dev.bitmap.count(1, first, first + slot.size // dev.block_size) > 0
        # dynamic: mapped exactly while it holds a plugged block; otherwise always mapped.
        holds = plugged or not dev.dynamic
        assert slot.mapped == holds, slot
        assert slot.plugged_blocks == dev.bitmap.count(
            1, first, first + slot.size // dev.block_size
        )
        assert (slot.gpa in mapped_gpas) == holds
        if m.vm.is_real:  # read the kernel's own slot table back
            assert m.vm.probe_mapped(slot.gpa) == holds
            assert m.vm.probe_mapped(slot.gpa + slot.size - 4096) == holds
    assert m.device_memory is not None
    assert m.device_memory.used_memslots == dev.mapped_memslots
    assert m.device_memory.used_memslots <= m.device_memory.required_memslots


class DirectChannel:
    """Requests as bytes straight into the device (the virtqueue path is tested elsewhere)."""

    def __init__(self, dev: VirtioMem) -> None:
        self.dev = dev

    def read_config(self) -> Config:
        return self.dev.config()

    def send(self, request: Request) -> Response | None:
        return Response.unpack(self.dev.handle_request(request.pack()))


def boot(
    dev: VirtioMem, sched: Scheduler, opts: GuestOptions | None = None, memory: object = None
) -> LinuxGuest:
    """A Linux guest model on ``dev`` over a :class:`DirectChannel`, probed and settled."""
    guest = LinuxGuest(DirectChannel(dev), sched, opts, memory=memory)  # type: ignore[arg-type]
    dev.config_change_listeners.append(lambda d: guest.config_interrupt())
    guest.probe()
    sched.run_until(lambda: guest.idle, sched.now() + 1)
    return guest


def machine_with(requested: str = "0", size: str = "4G", extra: str = "") -> Machine:
    """A machine on the KVM model with one virtio-mem device ``vmem0`` of ``size`` (mapped
    without reserving it, so that a device larger than the host's RAM still maps)."""
    return Machine(
        parse_machine_config(
            "4G,maxmem=68G",
            [f"memory-backend-ram,id=mem0,size={size},reserve=off"],
            [f"virtio-mem,id=vmem0,memdev=mem0,requested-size={requested}{extra}"],
            accel="sim",
        ),
        vm=KvmModel(),
    )


#: The issue's machine, as command-line arguments: a 1 TiB virtio-mem device with dynamic
#: memslots: the acceptance shape of ``plan``, and the machine a big resize runs on.
ACCEPTANCE = [
    "-m",
    "4G,maxmem=1028G",
    "-object",
    "memory-backend-ram,id=mem0,size=1T,reserve=off",
    "-device",
    "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
]


#: The vhost-user requests of QEMU's negotiation, in order.
NEGOTIATION = [
    "GET_FEATURES",
    "SET_OWNER",
    "GET_PROTOCOL_FEATURES",
    "SET_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "GET_MAX_MEM_SLOTS",
]


def memfd_machine(size: str = "8G", maxmem: str = "9G") -> Machine:
    """A machine on the KVM model with a shared memfd backend ``mem0`` and no device."""
    config = parse_machine_config(
        f"1G,maxmem={maxmem}",
        [f"memory-backend-memfd,id=mem0,size={size},share=on"],
        [],
        accel="sim",
    )
    return Machine(config, vm=KvmModel())


def add_virtio_mem(m: Machine, how: str) -> VirtioMem:
    """Plug virtio-mem ``vm0`` on ``mem0`` with the options ``how``."""
    dev = m.add_device(parse_device(f"virtio-mem,id=vm0,memdev=mem0,{how}"))
    assert isinstance(dev, VirtioMem)
    return dev


def assert_maps(pid: int, m: Machine, consumer: VhostUserConsumer) -> None:
    """The back-end maps exactly the fd-backed sections of the machine (each from file
    offset 0 to the end of its slice, as libvhost-user 7.2 does)."""
    sections = [s for s in m.address_space.sections if s.fd is not None]
    want = sorted((os.fstat(s.fd).st_ino, s.fd_offset + s.size) for s in sections if s.fd)
    got = memfd_mappings(pid)
    assert sorted((g.inode, g.size) for g in got) == want
    assert all(g.offset == 0 for g in got)
    assert consumer.regions == sorted(MemRegion.of(s) for s in sections)
    assert consumer.frontend is not None and set(consumer.frontend.table) == {
        r.key for r in consumer.regions
    }
