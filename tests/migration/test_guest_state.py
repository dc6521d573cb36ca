"""The guest travels with the machine: the Linux driver model (its timers relative to the
clock), the virtqueue on both sides and the probe vCPU's registers are STATE sections; the
destination resumes them where the source stopped. Two machines in one process, on the
simulated clock."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from conftest import requires_kvm

from memslots.devices.virtio_mem.wire import Resp
from memslots.errors import MigrationError
from memslots.guest.linux import RETRY_START
from memslots.guest.sched import Scheduler
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine, create_vm
from memslots.machine.vm import GuestVm
from memslots.migration.channel import BytesSource, MemorySink, SocketSink, SocketSource
from memslots.migration.machine import LoadedMachine, load_machine, save_machine, section_name
from memslots.migration.stream import StreamReader, StreamWriter
from memslots.options import MachineConfig, parse_machine_config
from memslots.sizes import GiB, MiB


def config(accel: str) -> MachineConfig:
    return parse_machine_config(
        "1G,maxmem=9G",
        ["memory-backend-memfd,id=mem0,size=8G"],
        ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"],
        accel=accel,
    )


def machine(accel: str, *, incoming: bool = False) -> Machine:
    vm = KvmModel() if accel == "sim" else create_vm("kvm")
    return Machine(config(accel), vm=vm, incoming=incoming)


def migrate(src: Machine, gvm: GuestVm, dst: Machine) -> LoadedMachine:
    states, virtio = gvm.save_state()
    by_section = {section_name(src.virtio_mem(k)): v for k, v in virtio.items()}
    sink = MemorySink()
    save_machine(src, StreamWriter(sink), states=states, virtio=by_section)
    return load_machine(dst, StreamReader(BytesSource(bytes(sink.data))))


def resume(dst: Machine, loaded: LoadedMachine, sched: Scheduler) -> GuestVm:
    virtio = {
        d.id: loaded.virtio[section_name(d)] for d in dst.virtio_mem_devices if d.id is not None
    }
    return GuestVm(dst, sched, states=loaded.states, virtio=virtio)


@pytest.mark.parametrize("accel", ["sim", pytest.param("kvm", marks=requires_kvm)])
def test_the_guest_resumes_on_the_destination_where_it_stopped(accel: str) -> None:
    with machine(accel) as src, GuestVm(src, Scheduler()) as gvm:
        src_dev = src.virtio_mem("vmem0")
        assert gvm.resize("vmem0", 1 * GiB).wait(60).ok
        driver = gvm.guests["vmem0"]
        driver.set_workload(8, 1.0)
        gvm.settle(3.5)
        assert driver.workload_ticks == 3
        # Migration starts: the device is busy; the guest asks for more and gets BUSY.
        src_dev.busy = True
        gvm.resize("vmem0", 2 * GiB)
        gvm.settle(10)
        assert driver.log[-1].type == "plug" and driver.log[-1].response == Resp.BUSY.name.lower()
        assert driver.timer_due == pytest.approx(gvm.sched.now() - 10 + RETRY_START)
        ticks = driver.workload_ticks
        if gvm.vcpu is not None:
            regs = gvm.vcpu.save_state()
        with machine(accel, incoming=True) as dst:
            loaded = migrate(src, gvm, dst)
            assert set(loaded.states) == {"guest/vmem0"} | ({"vcpu/0"} if accel == "kvm" else set())
            # The destination's clock is its own: the timer keeps the 40 s it had left.
            sched = Scheduler(start=1000.0)
            with resume(dst, loaded, sched) as dvm:
                moved = dvm.guests["vmem0"]
                assert moved.timer_due == pytest.approx(1000.0 + RETRY_START - 10)
                assert moved.workload_units == 8 and moved.workload_ticks == ticks
                assert moved.verify() > 0 and moved.violations == []
                if dvm.vcpu is not None:
                    assert dvm.vcpu.save_state() == regs
                dst_dev = dst.virtio_mem("vmem0")
                assert dst_dev.requested_size == 2 * GiB and dst_dev.size == 1 * GiB
                dvm.settle(RETRY_START - 10 - 1)
                assert dst_dev.size == 1 * GiB  # not before the timer
                dvm.settle(2)
                assert dst_dev.size == 2 * GiB
                assert moved.workload_ticks > ticks
                assert moved.verify() > 0 and moved.violations == []
                # The queue goes on from the source's indices.
                assert dvm.resize("vmem0", 512 * MiB).wait(60).ok
                assert moved.violations == []


def test_a_destination_refuses_a_guest_it_cannot_run() -> None:
    with machine("sim") as src, GuestVm(src, Scheduler()) as gvm:
        assert gvm.resize("vmem0", 256 * MiB).wait(60).ok
        with machine("sim", incoming=True) as dst:
            loaded = migrate(src, gvm, dst)
            broken = dict(loaded.states)
            version, data = broken["guest/vmem0"]
            state = json.loads(data)
            state["queue"]["free"] = state["queue"]["free"][1:]
            broken["guest/vmem0"] = (version, json.dumps(state).encode())
            virtio = {"vmem0": loaded.virtio["virtio-mem/vmem0"]}
            with pytest.raises(MigrationError, match="STATE section 'guest/vmem0' is malformed"):
                GuestVm(dst, Scheduler(), states=broken, virtio=virtio)
            with pytest.raises(MigrationError, match="malformed virtio state"):
                GuestVm(dst, Scheduler(), states=loaded.states, virtio={"vmem0": b"{"})
            with pytest.raises(MigrationError, match="has version 9"):
                GuestVm(dst, Scheduler(), states={"guest/vmem0": (9, data)}, virtio=virtio)
            extra = {**loaded.states, "guest/other": (1, b"{}")}
            with pytest.raises(MigrationError, match=r"Unknown savevm section .*guest/other"):
                GuestVm(dst, Scheduler(), states=extra, virtio=virtio)
            with pytest.raises(MigrationError, match="no STATE section 'guest/vmem0'"):
                GuestVm(dst, Scheduler(), states={}, virtio=virtio)


def test_a_destination_adopts_shared_memory_handed_over_by_fd() -> None:
    """x-ignore-shared on the machine level: the source's memfd replaces the destination's
    (same host address), nothing of it is sent, and unplugged memory is not discarded."""
    with machine("sim") as src, GuestVm(src, Scheduler()) as gvm:
        assert gvm.resize("vmem0", 1 * GiB).wait(60).ok
        memory = src.virtio_mem("vmem0").memdev
        assert memory is not None
        src_mem = memory.memory
        ino = os.fstat(src_mem.fd or -1).st_ino
        states, virtio = gvm.save_state()
        by_section = {section_name(src.virtio_mem(k)): v for k, v in virtio.items()}
        with machine("sim", incoming=True) as dst:
            dst_mem = dst.backends["mem0"].memory
            addr = dst_mem.host_addr
            a, b = socket.socketpair()
            writer = StreamWriter(SocketSink(a))
            out: dict[str, object] = {}

            def read() -> None:
                try:
                    out["loaded"] = load_machine(dst, StreamReader(SocketSource(b)))
                except Exception as exc:
                    out["error"] = exc

            reader = threading.Thread(target=read)
            reader.start()
            stats = save_machine(src, writer, states=states, virtio=by_section, ignored={"mem0"})
            reader.join(30)
            a.close()
            b.close()
            assert "error" not in out, out
            assert os.fstat(dst_mem.fd or -1).st_ino == ino
            assert dst_mem.host_addr == addr
            # Only boot RAM travelled: no page of the shared memory is in the stream.
            assert stats.normal_pages * 4096 + stats.zero_pages * 4096 == 1 * GiB
            src_mem.write(5 * MiB, b"shared")
            assert dst_mem.read(5 * MiB, 6) == b"shared"
