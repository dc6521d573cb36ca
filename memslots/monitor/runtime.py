"""``memslots run``: the machine as a long-running process with a QMP monitor.

One asyncio loop runs everything: the QMP server, the optional metrics endpoint, and the guest
drivers (on a :class:`~memslots.guest.sched.LoopScheduler`, so they never run in the middle of a
monitor command). SIGTERM, SIGINT and QMP ``quit`` shut down the same way: stop serving, detach
the guests, close the VM (the kernel frees every memslot with it) and release host memory.

The run state (QEMU's RunState, for ``query-status``) lives in :class:`MachineRuntime` alone:
``running``; ``internal-error`` once a guest access to memory out of its reach stopped the VM
(:class:`~memslots.machine.vm.GuestVm` stops its guests and vCPU; ``cont`` is refused); after a
``system_reset`` from there ``prelaunch`` (as QEMU), which ``cont`` turns into ``running``
again; ``shutdown`` on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from memslots.devices.memory_device import MemoryDevice
from memslots.errors import ConfigError
from memslots.guest.linux import GuestOptions
from memslots.guest.sched import LoopScheduler
from memslots.host.kmem import KmemMeter
from memslots.kvm.abi import VmBackend
from memslots.kvm.host import host_info, open_vm_meter
from memslots.machine.machine import Machine, create_vm, uses_real_kvm
from memslots.machine.vm import GuestFault, GuestVm, ObservedChannel
from memslots.monitor.commands import Monitor
from memslots.monitor.metrics import Metrics
from memslots.monitor.qmp_server import QMPServer
from memslots.options import (
    VHOST_USER_DRIVERS,
    MachineConfig,
    QmpEndpoint,
    vhost_user_device_from_args,
)

log = logging.getLogger("memslots.monitor.runtime")

#: Guest requests each guest driver keeps in its log: the process runs for as long as it is
#: asked to, so the log is a bounded window (nothing here reads older requests).
REQUEST_LOG = 1024


class VhostUserProvider:
    """``device_add``/``device_del`` of vhost-user devices (a :class:`DeviceProvider`)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def drivers(self) -> Sequence[str]:
        """vhost-user-blk[-pci] and vhost-user-fs[-pci]."""
        return VHOST_USER_DRIVERS

    def add_device(self, args: dict[str, Any]) -> None:
        """Parse the arguments with the command line's rules and attach the device."""
        self.machine.add_vhost_user_device(vhost_user_device_from_args(args))

    def has_device(self, dev_id: str) -> bool:
        """True for a vhost-user device of this machine."""
        return dev_id in self.machine.vhost_devices

    def remove_device(self, dev_id: str) -> None:
        """Detach the device: its back-end is told and its regions leave the budget."""
        self.machine.remove_device(dev_id)


class MachineRuntime:
    """The running machine as the monitor sees it (:class:`memslots.monitor.commands.Runtime`)."""

    def __init__(
        self, machine: Machine, stopped: asyncio.Event, guests: GuestVm | None = None
    ) -> None:
        self._machine = machine
        self._stopped = stopped
        self._guests = guests
        self._state = "running"
        #: Called after every system reset (the runtime re-wraps the new drivers' channels).
        self.reset_listeners: list[Callable[[], None]] = []

    @property
    def machine(self) -> Machine:
        """The machine."""
        return self._machine

    @property
    def guests(self) -> GuestVm | None:
        """The guest side (None with ``-guest none``)."""
        return self._guests

    def status(self) -> str:
        """QEMU's RunState name."""
        return self._state

    def quit(self) -> None:
        """Ask the process to shut down (the loop's main task does the work)."""
        self._state = "shutdown"
        self._stopped.set()

    def guest_fault(self, fault: GuestFault) -> None:
        """The guests stopped on a memory fault: QEMU's ``internal-error``."""
        self._state = "internal-error"

    def cont(self) -> None:
        """Run the VM again (the monitor refuses ``cont`` while it needs a reset)."""
        if self._guests is not None:
            self._guests.start()
        self._state = "running"

    def system_reset(self) -> None:
        """The one entry point of a system reset: virtio-mem memory is unplugged and, with
        guests, every driver and the vCPU start over (:meth:`GuestVm.system_reset`). A VM
        stopped on an internal error is then in ``prelaunch`` until ``cont``."""
        if self._guests is not None:
            self._guests.system_reset()
        else:
            self._machine.system_reset()
        if self._state == "internal-error":
            self._state = "prelaunch"
        for cb in list(self.reset_listeners):
            cb()

    def guest_memory_access(self, address: int, *, write: bool, value: int) -> int | None:
        """The guest's CPU touches a byte (:meth:`GuestVm.guest_access`)."""
        if self._guests is None:
            raise ConfigError("the machine runs without a guest (-guest none)")
        return self._guests.guest_access(address, write=write, value=value)


async def serve(
    config: MachineConfig,
    endpoints: list[QmpEndpoint],
    *,
    guest: bool = True,
    metrics_port: int | None = None,
    vm_factory: Callable[[], VmBackend] | None = None,
    ready: Callable[[MachineRuntime], None] | None = None,
    install_signals: bool = True,
) -> None:
    """Run the machine until ``quit``, SIGTERM or SIGINT; then shut down cleanly.

    On the real kernel the process lives in a memory cgroup of its own from before the VM is
    created until after it is closed (:mod:`memslots.host.kmem`), so the QMP command
    ``x-query-kernel-metadata`` and the metrics report this VM's kernel memory only.
    """
    real = vm_factory is not None or uses_real_kvm(config.accel, host_info())
    with open_vm_meter() if real else contextlib.nullcontext() as kmem:
        await _serve(
            config,
            endpoints,
            guest=guest,
            metrics_port=metrics_port,
            vm_factory=vm_factory,
            ready=ready,
            install_signals=install_signals,
            kmem=kmem,
        )


async def _serve(
    config: MachineConfig,
    endpoints: list[QmpEndpoint],
    *,
    guest: bool,
    metrics_port: int | None,
    vm_factory: Callable[[], VmBackend] | None,
    ready: Callable[[MachineRuntime], None] | None,
    install_signals: bool,
    kmem: KmemMeter | None,
) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    vm = (
        vm_factory()
        if vm_factory is not None
        else create_vm(config.accel, host=host_info(), slot_zap_all=config.slot_zap_all)
    )
    machine = Machine(config, vm=vm, host=host_info())
    gvm = (
        GuestVm(
            machine,
            LoopScheduler(loop),
            guest_options=GuestOptions(boot_memory_end=0, request_log=REQUEST_LOG),
        )
        if guest
        else None
    )
    runtime = MachineRuntime(machine, stopped, gvm)
    server = QMPServer()
    monitor = Monitor(runtime, server, kmem=kmem)
    monitor.add_device_provider(VhostUserProvider(machine))
    metrics = Metrics(machine, kmem) if metrics_port is not None else None

    def observe_guest(dev_id: str) -> None:
        if gvm is not None and metrics is not None and dev_id in gvm.guests:
            g = gvm.guests[dev_id]
            g.channel = ObservedChannel(g.channel, metrics.observe)

    if gvm is not None:
        monitor.guests = gvm.guests
        for dev_id in gvm.guests:
            observe_guest(dev_id)

        def added(dev: MemoryDevice) -> None:
            # A hot-plugged virtio-mem device gets a guest driver.
            for dev_id in gvm.attach_new():
                observe_guest(dev_id)

        monitor.device_added.append(added)
        monitor.device_removed.append(gvm.detach)

        def restarted() -> None:
            # A reset gave every device a new driver, on a new channel.
            for dev_id in gvm.guests:
                observe_guest(dev_id)

        def faulted(fault: GuestFault) -> None:
            runtime.guest_fault(fault)
            monitor.guest_memory_fault(fault)

        runtime.reset_listeners.append(restarted)
        gvm.fault_listeners.append(faulted)
    try:
        for ep in endpoints:
            if ep.path is not None:
                await server.start_unix(ep.path)
            else:
                assert ep.host is not None and ep.port is not None
                await server.start_tcp(ep.host, ep.port)
        if metrics is not None:
            assert metrics_port is not None
            host, port = await metrics.start(metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, port)
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, runtime.quit)
        if ready is not None:
            ready(runtime)
        await stopped.wait()
    finally:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        await server.close()
        if metrics is not None:
            await metrics.close()
        monitor.close()
        if gvm is not None:
            gvm.close()
        machine.close()
