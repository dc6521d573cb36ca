"""The Linux guest driver model: the reference's worked request streams, exactly, and the rules."""

from __future__ import annotations

import pytest
from conftest import PlanFactory
from machines import DirectChannel, boot, machine_with

from memslots.devices.virtio_mem.wire import Request
from memslots.guest.linux import GuestOptions, LinuxGuest, Online, RamUser, memory_block_size
from memslots.guest.sched import Scheduler
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory
from memslots.options import parse_machine_config
from memslots.sizes import GiB, MiB


def stream(guest: LinuxGuest, start: int = 0) -> list[tuple[str, int, int]]:
    return [(r.type, r.offset // MiB, r.nb_blocks) for r in guest.log[start:]]


def test_memory_block_size() -> None:
    assert memory_block_size(5 * GiB) == 128 * MiB
    assert memory_block_size(1024 * GiB + GiB) == GiB  # RAM above 4G relocated to 1 TiB
    assert memory_block_size(96 * GiB) == 2 * GiB
    assert memory_block_size(64 * GiB + 128 * MiB) == 128 * MiB
    assert memory_block_size(96 * GiB, in_vm=False) == 2 * GiB


def test_worked_streams(plan_machine: PlanFactory) -> None:
    """docs/reference/linux-guest-driver.md C9: boot at 512 MiB, 512 -> 900 MiB, 900 -> 700 MiB."""
    m = Machine(
        parse_machine_config(
            "4G,maxmem=8G",
            ["memory-backend-ram,id=mem0,size=2G"],
            ["virtio-mem,id=vmem0,memdev=mem0,requested-size=512M"],
            accel="sim",
        ),
        vm=KvmModel(),
    )
    with m:
        dev = m.virtio_mem("vmem0")
        assert dev.addr % (128 * MiB) == 0
        sched = Scheduler()
        guest = boot(
            dev, sched, GuestOptions(boot_memory_end=5 * GiB), RamUser(GuestMemory(m.address_space))
        )
        assert guest.sbm and guest.unit == 2 * MiB and guest.per_unit == 64
        assert stream(guest) == [
            ("plug", 0, 64),
            ("plug", 128, 64),
            ("plug", 256, 64),
            ("plug", 384, 64),
        ]
        n = len(guest.log)
        dev.set_requested_size(900 * MiB)
        sched.run_until(lambda: guest.idle, sched.now() + 1)
        assert stream(guest, n) == [
            ("plug", 512, 64),
            ("plug", 640, 64),
            ("plug", 768, 64),
            ("plug", 896, 2),
        ]
        n = len(guest.log)
        dev.set_requested_size(700 * MiB)
        sched.run_until(lambda: guest.idle, sched.now() + 1)
        expected = [("unplug", 898, 1), ("unplug", 896, 1), ("unplug", 768, 64)]
        expected += [("unplug", off, 1) for off in range(766, 699, -2)]
        assert len(expected) == 3 + 34
        assert stream(guest, n) == expected
        assert dev.size == 700 * MiB and guest.plugged_size == 700 * MiB
        assert all(r.response == "ack" for r in guest.log)
        assert guest.verify() == 350 and guest.violations == []


def test_unplug_all_at_probe_when_memory_is_plugged() -> None:
    with machine_with("256M") as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        first = boot(dev, sched)
        assert dev.size == 256 * MiB
        # a rebooted guest (no system reset): the new driver finds memory plugged
        second = boot(dev, sched)
        assert stream(second)[0] == ("unplug_all", 0, 0)
        assert [r[0] for r in stream(second)[1:]] == ["plug", "plug"]
        assert dev.size == 256 * MiB and first is not second


def test_busy_backoff_doubles_to_300s() -> None:
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched)
        dev.busy = True
        dev.set_requested_size(128 * MiB)
        times = []
        for _ in range(6):
            sched.run_until(lambda: guest.timer_due is not None, sched.now() + 1)
            due = guest.timer_due
            assert due is not None
            times.append(due - sched.now())
            sched.run_until(lambda: False, due)  # let the timer fire
        assert times == [50, 100, 200, 300, 300, 300]
        assert all(r.response == "busy" for r in guest.log)
        dev.busy = False
        sched.advance(300)
        assert dev.size == 128 * MiB and guest.retry_period == 50


def test_error_breaks_the_driver() -> None:
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched)
        dev.set_requested_size(256 * MiB)
        # Someone else plugs block 0 behind the driver's back: its PLUG of the first memory
        # block now covers a plugged block, which the device answers with ERROR.
        DirectChannel(dev).send(Request(0, dev.addr, 1))
        sched.advance(1)
        assert guest.broken and guest.log[-1].response == "error"
        n = len(guest.log)
        dev.set_requested_size(256 * MiB)
        sched.advance(1000)
        assert len(guest.log) == n  # a broken driver ignores the device


def test_remainder_below_a_subblock_is_left() -> None:
    with machine_with(extra=",block-size=1M") as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched)
        assert guest.unit == 2 * MiB  # pageblock size wins over the 1 MiB device block
        dev.set_requested_size(5 * MiB)
        sched.advance(1)
        assert dev.size == 4 * MiB and stream(guest) == [("plug", 0, 4)]
        assert guest.idle


def test_offline_policy_stops_at_the_threshold() -> None:
    with machine_with(size="4G") as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched, GuestOptions(online=Online.OFFLINE))
        dev.set_requested_size(2 * GiB)
        sched.advance(1)
        # at most max(2 x 128 MiB, 1 GiB) of added-but-offline memory
        assert dev.size == GiB and guest.stopped_no_space
        guest.online_all()
        sched.advance(1)
        assert dev.size == 2 * GiB


def test_pinned_subblocks_are_skipped_in_kernel_zone() -> None:
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        pinned = frozenset({126 * MiB})
        guest = boot(dev, sched, GuestOptions(online=Online.KERNEL, pinned=pinned))
        dev.set_requested_size(128 * MiB)
        sched.advance(1)
        n = len(guest.log)
        dev.set_requested_size(0)
        sched.advance(1)
        offsets = [r.offset // MiB for r in guest.log[n:]]
        assert 126 not in offsets and offsets[0] == 124  # whole block failed, per sub-block
        assert dev.size == 2 * MiB and guest.timer_due is not None  # leftover -> retry timer


def test_bbm_with_large_device_blocks() -> None:
    with machine_with(size="4G", extra=",block-size=256M") as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched)
        assert not guest.sbm and guest.unit == 256 * MiB
        dev.set_requested_size(GiB)
        sched.advance(1)
        assert stream(guest) == [
            ("plug", 0, 1),
            ("plug", 256, 1),
            ("plug", 512, 1),
            ("plug", 768, 1),
        ]
        n = len(guest.log)
        dev.set_requested_size(512 * MiB)
        sched.advance(1)
        assert stream(guest, n) == [("unplug", 768, 1), ("unplug", 512, 1)]


@pytest.mark.parametrize("online", [Online.MOVABLE, Online.KERNEL])
def test_guest_catches_lost_memory(online: Online) -> None:
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched, GuestOptions(online=online), RamUser(GuestMemory(m.address_space)))
        dev.set_requested_size(64 * MiB)
        sched.advance(1)
        assert guest.verify() == 32 and guest.violations == []
        assert dev.memdev is not None
        dev.memdev.memory.discard(0, 64 * MiB)  # the host loses plugged memory
        guest.verify()
        assert len(guest.violations) == 32


def test_request_log_can_be_bounded() -> None:
    """A long-running machine keeps the last requests only (``memslots run`` grew by the log
    without end: +1.38 MiB per 1000 plug/unplug cycles); simulate keeps them all."""
    m = Machine(
        parse_machine_config(
            "4G,maxmem=8G",
            ["memory-backend-ram,id=mem0,size=2G"],
            ["virtio-mem,id=vmem0,memdev=mem0"],
            accel="sim",
        ),
        vm=KvmModel(),
    )
    with m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        opts = GuestOptions(boot_memory_end=5 * GiB, request_log=8)
        guest = boot(dev, sched, opts, RamUser(GuestMemory(m.address_space)))
        sizes = []
        for cycle in range(12):
            dev.set_requested_size(512 * MiB if cycle % 2 == 0 else 0)
            sched.run_until(lambda: guest.idle, sched.now() + 10)
            assert dev.size == dev.requested_size
            sizes.append(len(guest.log))
        assert min(sizes[3:]) >= 8 and max(sizes) <= 16
        # the newest requests are kept: the last unplug's
        assert guest.log[-1].type == "unplug"


def test_why_the_driver_stops_short() -> None:
    # Each way Linux's driver leaves the device short of the request, said in its own terms.
    with machine_with(extra=",block-size=1M") as m:
        dev, sched = m.virtio_mem("vmem0"), Scheduler()
        guest = boot(dev, sched)
        dev.set_requested_size(5 * MiB)
        sched.advance(1)
        assert guest.stop_reason == (
            "the rest (1 MiB) is less than one sub-block (2 MiB), the driver's unit"
        )
    with machine_with(size="4G") as m:
        dev, sched = m.virtio_mem("vmem0"), Scheduler()
        guest = boot(dev, sched, GuestOptions(online=Online.OFFLINE))
        dev.set_requested_size(2 * GiB)
        sched.advance(1)
        assert guest.stop_reason == (
            "1 GiB of added memory is still offline: Linux adds no more until it is onlined "
            "(offline threshold 1 GiB)"
        )
        guest.online_all()
        sched.advance(1)
        assert dev.size == 2 * GiB and guest.stop_reason is None
    with machine_with() as m:
        dev, sched = m.virtio_mem("vmem0"), Scheduler()
        guest = boot(dev, sched, GuestOptions(online=Online.KERNEL, pinned=frozenset({0})))
        dev.set_requested_size(128 * MiB)
        sched.advance(1)
        dev.set_requested_size(0)
        sched.advance(1)
        assert guest.stop_reason is not None
        assert guest.stop_reason.startswith("2 MiB could not be unplugged: the memory left in use")


def test_a_memory_block_past_the_usable_region_stops_the_driver() -> None:
    # An AMD host moves boot RAM above 4 GiB to 1 TiB: with 4 GiB of RAM it ends at 1025 GiB,
    # so Linux picks 1 GiB memory blocks (the largest power of two up to 2 GiB dividing the
    # end). 21.5 GiB requested makes the usable region 21.75 GiB (256 MiB beyond): 21 whole
    # blocks fit, the 22nd does not, and Linux only adds whole memory blocks.
    with machine_with(size="32G") as m:
        dev, sched = m.virtio_mem("vmem0"), Scheduler()
        guest = boot(dev, sched, GuestOptions(boot_memory_end=1025 * GiB))
        assert guest.mb_size == GiB and dev.addr % GiB == 0
        dev.set_requested_size(21 * GiB + 512 * MiB)
        sched.advance(1)
        assert dev.size == 21 * GiB and guest.stopped_no_space
        end = dev.addr + 21 * GiB + 768 * MiB
        assert guest.stop_reason == (
            f"the next Linux memory block (1 GiB at 0x{dev.addr + 21 * GiB:x}) does not fit the "
            f"usable region (up to 0x{end:x}): Linux adds memory in whole memory blocks"
        )
        dev.set_requested_size(22 * GiB)
        sched.advance(1)
        assert dev.size == 22 * GiB and guest.stop_reason is None
