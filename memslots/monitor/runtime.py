"""``memslots run``: the machine as a long-running process with a QMP monitor.

An asyncio loop serves QMP, the optional metrics endpoint and the signals; the guest drivers run
in a thread of their own (:class:`~memslots.machine.runner.MachineRunner`, on a
:class:`~memslots.guest.sched.ThreadScheduler`), and commands and scrapes that read or change the
machine run in the runner's worker, all of them holding the machine lock. So the monitor answers
while a guest resizes or a vhost-user back-end keeps a request waiting, and no command runs in
the middle of a guest request. SIGTERM, SIGINT and QMP ``quit`` shut down the same way: stop the
guests between two requests (interrupting any wait for a back-end), stop serving, detach the
guests, close the VM (the kernel frees every memslot with it) and release host memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from memslots.devices.memory_device import MemoryDevice
from memslots.guest.sched import ThreadScheduler
from memslots.host.kmem import KmemMeter
from memslots.kvm.abi import VmBackend
from memslots.kvm.host import open_vm_meter
from memslots.machine.machine import Machine, create_vm, uses_real_kvm
from memslots.machine.runner import MachineRunner
from memslots.machine.vm import CheckpointChannel, GuestVm, ObservedChannel
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
    """The running machine as the monitor sees it (:class:`memslots.monitor.commands.Runtime`).

    ``runner`` holds the machine lock and runs the guests (pause them with it).
    """

    def __init__(self, machine: Machine, stopped: asyncio.Event, runner: MachineRunner) -> None:
        self._machine = machine
        self._stopped = stopped
        self.runner = runner
        self._state = "running"

    @property
    def machine(self) -> Machine:
        """The machine."""
        return self._machine

    def status(self) -> str:
        """QEMU's RunState name."""
        return self._state

    def quit(self) -> None:
        """Ask the process to shut down (the loop's main task does the work)."""
        self._state = "shutdown"
        self._stopped.set()


def _interrupt_backends(machine: Machine) -> None:
    # Called from the loop while another thread may wait for a back-end: the list is copied
    # in one step, and interrupting is safe from any thread.
    for dev in list(machine.vhost_user_devices):
        dev.consumer.interrupt()


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
    real = vm_factory is not None or uses_real_kvm(config.accel)
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
        else create_vm(config.accel, slot_zap_all=config.slot_zap_all)
    )
    machine = Machine(config, vm=vm)
    runner = MachineRunner(interrupt=lambda: _interrupt_backends(machine))
    runtime = MachineRuntime(machine, stopped, runner)
    server = QMPServer()
    monitor = Monitor(runtime, server, kmem=kmem, runner=runner)
    monitor.add_device_provider(VhostUserProvider(machine))
    metrics = Metrics(machine, kmem, runner) if metrics_port is not None else None
    sched = ThreadScheduler()
    gvm = GuestVm(machine, sched) if guest else None

    def wire_guest(dev_id: str) -> None:
        # Its requests: timed for the metrics, each after a checkpoint of the guests' thread.
        assert gvm is not None
        g = gvm.guests[dev_id]
        if metrics is not None:
            g.channel = ObservedChannel(g.channel, metrics.observe)
        g.channel = CheckpointChannel(g.channel, runner.checkpoint)

    if gvm is not None:
        for dev_id in gvm.guests:
            wire_guest(dev_id)

        def added(dev: MemoryDevice) -> None:
            # A hot-plugged virtio-mem device gets a guest driver.
            for dev_id in gvm.attach_new():
                wire_guest(dev_id)

        monitor.device_added.append(added)
        monitor.device_removed.append(gvm.detach)
    runner.start_guests(sched)
    try:
        # Before listening: whoever sees the socket may already send SIGTERM.
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, runtime.quit)
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
        if ready is not None:
            ready(runtime)
        await stopped.wait()
    finally:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        # First the guests and the worker (within one request: back-end waits are interrupted),
        # so that nothing else touches the machine from here on.
        runner.stop()
        await server.close()
        if metrics is not None:
            await metrics.close()
        monitor.close()
        if gvm is not None:
            gvm.close()
        machine.close()
