"""``memslots run``: the machine as a long-running process with a QMP monitor.

An asyncio loop serves QMP, the optional metrics endpoint and the signals, and runs the
migration jobs (:mod:`memslots.monitor.migration`), which move bytes in worker threads; the
guest drivers run in a thread of their own (:class:`~memslots.machine.runner.MachineRunner`, on
a :class:`~memslots.guest.sched.ThreadScheduler`), and commands, scrapes and the migration steps
that read or change the machine run in the runner's worker, all of them holding the machine
lock. So the monitor answers while a guest resizes or a vhost-user back-end keeps a request
waiting, and nothing runs in the middle of a guest request. SIGTERM, SIGINT and QMP ``quit``
shut down the same way: stop the guests between two requests (interrupting any wait for a
back-end), stop serving, end a migration that still runs, detach the guests, close the VM (the
kernel frees every memslot with it) and release host memory.

The run state (QEMU's RunState, for ``query-status``) lives in :class:`MachineRuntime` alone:
``running``, ``paused`` (QMP ``stop``), ``prelaunch`` (``-S``, or after a ``system_reset`` from
``internal-error``, as QEMU), ``inmigrate`` (``-incoming``), ``finish-migrate`` and
``postmigrate`` (a migration's switch-over and after), ``internal-error`` (a guest access to
memory out of its reach stopped the VM: :class:`~memslots.machine.vm.GuestVm` stops its drivers
and vCPU, and ``cont`` is refused until a reset), ``shutdown``. Stopping the guest pauses its
scheduler (its clock stands still and no callback starts) and holds its thread at the next
request (STOP); ``cont`` starts both again (RESUME). A destination builds its guest only once
the stream is loaded, from the source's STATE sections, and a destination whose load fails ends
the process with that error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from memslots.devices.memory_device import MemoryDevice
from memslots.errors import ConfigError, DeviceError, MemslotsError, MigrationError
from memslots.guest.linux import GuestOptions
from memslots.guest.sched import ThreadScheduler
from memslots.host.kmem import KmemMeter
from memslots.kvm.abi import VmBackend
from memslots.kvm.host import host_info, open_vm_meter
from memslots.machine.machine import Machine, create_vm, uses_real_kvm
from memslots.machine.runner import MachineRunner
from memslots.machine.vm import CheckpointChannel, GuestFault, GuestVm, ObservedChannel
from memslots.migration.machine import LoadedMachine, section_name
from memslots.monitor.commands import Monitor
from memslots.monitor.guest import GuestCommands
from memslots.monitor.metrics import Metrics
from memslots.monitor.migration import MigrationMonitor
from memslots.monitor.qmp_server import QMPServer
from memslots.monitor.runstate import (
    INMIGRATE,
    INTERNAL_ERROR,
    PAUSED,
    PRELAUNCH,
    RUNNING,
    SHUTDOWN,
)
from memslots.options import (
    VHOST_USER_DRIVERS,
    MachineConfig,
    MigrationUri,
    QmpEndpoint,
    vhost_user_device_from_args,
)

log = logging.getLogger("memslots.monitor.runtime")

T = TypeVar("T")

#: Guest requests each guest driver keeps in its log: the process runs for as long as it is
#: asked to, so the log is a bounded window (nothing here reads older requests).
REQUEST_LOG = 1024


def _guest_options() -> GuestOptions:
    return GuestOptions(boot_memory_end=0, request_log=REQUEST_LOG)


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
    """The running machine as the monitor sees it (:class:`memslots.monitor.commands.Runtime`
    and :class:`memslots.monitor.migration.RunControl`): the machine, its guest, its run
    state; ``runner`` holds the machine lock and runs the guests."""

    def __init__(
        self,
        machine: Machine,
        stopped: asyncio.Event,
        server: QMPServer,
        sched: ThreadScheduler,
        runner: MachineRunner,
        *,
        guest: bool = True,
        autostart: bool = True,
        incoming: bool = False,
    ) -> None:
        self._machine = machine
        self._guest_wanted = guest
        self._stopped = stopped
        self.server = server
        self.sched = sched
        self.runner = runner
        self.autostart = autostart
        self._state = INMIGRATE if incoming else RUNNING if autostart else PRELAUNCH
        if self._state != RUNNING:
            sched.pause()
        self._guest: GuestVm | None = None
        #: Called with the guest VM once it exists (at start, or after an incoming load).
        self.guest_listeners: list[Callable[[GuestVm], None]] = []
        #: Why the process must end with an error (a destination whose load failed).
        self.failure: MemslotsError | None = None
        #: Called whenever every guest driver started over (a system reset of a running VM, a
        #: ``cont`` after a reset): the runtime re-wraps the new drivers' channels.
        self.restart_listeners: list[Callable[[], None]] = []

    @property
    def machine(self) -> Machine:
        """The machine."""
        return self._machine

    @property
    def guest(self) -> GuestVm | None:
        """The guest VM, if any yet."""
        return self._guest

    def attach_guest(self, guest: GuestVm) -> None:
        """The guest VM drives the machine from now on."""
        self._guest = guest
        for cb in list(self.guest_listeners):
            cb(guest)

    def status(self) -> str:
        """QEMU's RunState name."""
        return self._state

    def set_status(self, state: str) -> None:
        """Enter ``state`` without stopping or starting the guest."""
        self._state = state

    def stop(self, state: str = PAUSED) -> bool:
        """Stop the guest (STOP, if it ran) and enter ``state``; True if it was running. Its
        thread stops before its next request (:meth:`quiesce` waits for it to be idle)."""
        was_running = self._state == RUNNING
        self.sched.pause()
        self.runner.pause()
        self._state = state
        if was_running:
            self.server.emit_event("STOP", {})
        return was_running

    def cont(self) -> None:
        """Run the guest (RESUME): its clock goes on where it stopped; a VM stopped by a fault
        and reset since boots fresh drivers (the monitor refuses ``cont`` while it needs a
        reset)."""
        if self._guest is not None and not self._guest.running:
            self._guest.start()
            for cb in list(self.restart_listeners):
                cb()
        self._state = RUNNING
        self.runner.resume()
        self.sched.resume()
        self.server.emit_event("RESUME", {})

    async def quiesce(self) -> None:
        """After :meth:`stop`: wait, off the loop, until the guests' thread runs no callback
        (one that was held at a request runs on to its end: a migration's devices answer BUSY
        meanwhile), so that the guest's state can be saved."""
        await asyncio.to_thread(self.runner.wait_idle)

    async def locked(self, fn: Callable[[], T], /) -> T:
        """``fn()`` in the runner's worker holding the machine lock (directly once the runner
        stopped: then nothing else runs)."""
        if self.runner.stopping:
            return fn()
        return await self.runner.run(fn)

    def resume_incoming(self, loaded: LoadedMachine) -> None:
        """After an incoming load: the guest resumes from the source's STATE sections (it
        runs once the run state says so)."""
        m = self._machine
        m.incoming = False
        if self._guest_wanted:
            virtio = {
                dev.id: loaded.virtio[section_name(dev)]
                for dev in m.virtio_mem_devices
                if dev.id is not None and section_name(dev) in loaded.virtio
            }
            self.attach_guest(
                GuestVm(
                    m,
                    self.sched,
                    guest_options=_guest_options(),
                    states=loaded.states,
                    virtio=virtio,
                )
            )
        elif loaded.states:
            name = sorted(loaded.states)[0]
            raise MigrationError(
                f"Unknown savevm section or instance '{name}' 0 (this destination runs no "
                "guest: -guest none)"
            )

    def incoming_failed(self, error: MigrationError) -> None:
        """A destination that could not load must not run: end the process with ``error``."""
        self.failure = MigrationError(f"load of migration failed: {error}")
        self.quit()

    def quit(self) -> None:
        """Ask the process to shut down (the loop's main task does the work)."""
        self._state = SHUTDOWN
        self._stopped.set()

    def guest_fault(self, fault: GuestFault) -> None:
        """The guest stopped on a memory fault: QEMU's ``internal-error``."""
        self._state = INTERNAL_ERROR

    def system_reset(self) -> None:
        """The one entry point of a system reset: virtio-mem memory is unplugged and, with a
        guest, every driver and the vCPU start over (:meth:`GuestVm.system_reset`). A VM
        stopped on an internal error is then in ``prelaunch`` until ``cont``."""
        if self._guest is not None:
            self._guest.system_reset()
        else:
            self._machine.system_reset()
        if self._state == INTERNAL_ERROR:
            self._state = PRELAUNCH
        if self._guest is None or self._guest.running:
            for cb in list(self.restart_listeners):
                cb()

    def guest_memory_access(self, address: int, *, write: bool, value: int) -> int | None:
        """The guest's CPU touches a byte (:meth:`GuestVm.guest_access`); only a running VM's
        does."""
        if self._guest is None:
            raise ConfigError("the machine runs without a guest (-guest none)")
        if self._state != RUNNING:
            raise DeviceError(f"the guest is not running: the VM is {self._state}")
        return self._guest.guest_access(address, write=write, value=value)


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
    incoming: MigrationUri | None = None,
    autostart: bool = True,
) -> None:
    """Run the machine until ``quit``, SIGTERM or SIGINT; then shut down cleanly.

    ``incoming`` (``-incoming``) makes the process a migration destination: it builds the
    machine for the stream, listens (unless ``defer``: QMP ``migrate-incoming`` then) and
    runs the machine once loaded; a load that fails raises :class:`MigrationError` after the
    shutdown. ``autostart`` False (``-S``) waits for ``cont``.

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
            incoming=incoming,
            autostart=autostart,
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
    incoming: MigrationUri | None,
    autostart: bool,
) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    vm = (
        vm_factory()
        if vm_factory is not None
        else create_vm(config.accel, host=host_info(), slot_zap_all=config.slot_zap_all)
    )
    machine = Machine(config, vm=vm, host=host_info(), incoming=incoming is not None)
    server = QMPServer()
    runner = MachineRunner(interrupt=lambda: _interrupt_backends(machine))
    sched = ThreadScheduler()
    runtime = MachineRuntime(
        machine,
        stopped,
        server,
        sched,
        runner,
        guest=guest,
        autostart=autostart,
        incoming=incoming is not None,
    )
    monitor = Monitor(runtime, server, kmem=kmem, runner=runner)
    monitor.add_device_provider(VhostUserProvider(machine))
    migration = MigrationMonitor(runtime, server)
    monitor.migrating = lambda: migration.migrating
    GuestCommands(runtime, server, runner=runner)
    metrics = Metrics(machine, kmem, runner) if metrics_port is not None else None

    def observe(gvm: GuestVm, dev_ids: Sequence[str]) -> None:
        # Each request: timed for the metrics, after a checkpoint of the guests' thread
        # (outermost, so that waiting there is no part of a request's latency).
        for dev_id in dev_ids:
            g = gvm.guests[dev_id]
            if metrics is not None:
                g.channel = ObservedChannel(g.channel, metrics.observe)
            g.channel = CheckpointChannel(g.channel, runner.checkpoint)

    def faulted(fault: GuestFault) -> None:
        runtime.guest_fault(fault)
        monitor.guest_memory_fault(fault)

    def guest_ready(gvm: GuestVm) -> None:
        observe(gvm, list(gvm.guests))
        gvm.fault_listeners.append(faulted)

    def restarted() -> None:
        # A reset gave every device a new driver, on a new channel.
        gvm = runtime.guest
        if gvm is not None:
            observe(gvm, list(gvm.guests))

    runtime.guest_listeners.append(guest_ready)
    runtime.restart_listeners.append(restarted)

    def added(dev: MemoryDevice) -> None:
        # A hot-plugged virtio-mem device gets a guest driver.
        gvm = runtime.guest
        if gvm is not None:
            observe(gvm, gvm.attach_new())

    def removed(dev_id: str) -> None:
        gvm = runtime.guest
        if gvm is not None:
            gvm.detach(dev_id)

    monitor.device_added.append(added)
    monitor.device_removed.append(removed)
    try:
        if guest and incoming is None:
            runtime.attach_guest(GuestVm(machine, sched, guest_options=_guest_options()))
        runner.start_guests(sched)
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
        if incoming is not None and incoming.transport != "defer":
            migration.start_incoming(incoming)
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
        await migration.close()
        if metrics is not None:
            await metrics.close()
        monitor.close()
        if runtime.guest is not None:
            runtime.guest.close()
        machine.close()
    if runtime.failure is not None:
        raise runtime.failure
