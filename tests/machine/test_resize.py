"""Resize jobs: reached, or stopped with a reason, within a (simulated) timeout."""

from __future__ import annotations

import itertools

import pytest
from machines import DirectChannel, boot, machine_with

from memslots.devices.virtio_mem.wire import Request
from memslots.errors import PropertyError
from memslots.guest.linux import GuestOptions, Online
from memslots.guest.sched import Scheduler
from memslots.machine.resize import Outcome, ResizeJob
from memslots.sizes import GiB, MiB


def test_reached_with_progress() -> None:
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched)
        seen: list[tuple[int, int]] = []
        job = ResizeJob(dev, GiB, sched, guest, on_progress=lambda p, r: seen.append((p, r)))
        res = job.wait(timeout=10)
        assert res.ok and res.outcome is Outcome.REACHED and res.plugged == GiB
        assert seen[-1] == (GiB, GiB) and len(seen) == 8  # one PLUG per 128 MiB memory block
        assert all(a[0] < b[0] for a, b in itertools.pairwise(seen))


def test_invalid_size_is_refused_at_once() -> None:
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        with pytest.raises(PropertyError, match="multiples of 'block-size'"):
            ResizeJob(dev, GiB + 4096, Scheduler(), None)
        assert dev.requested_size == 0


def test_backoff_reported_when_timeout_passes() -> None:
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched)
        dev.busy = True
        res = ResizeJob(dev, 256 * MiB, sched, guest).wait(timeout=30)
        assert res.outcome is Outcome.BACKOFF and "next retry at t=50s" in res.reason
        dev.busy = False
        res = ResizeJob(dev, 256 * MiB, sched, guest).wait(timeout=100)
        assert res.ok


def test_no_space_and_broken_and_no_guest() -> None:
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched, GuestOptions(online=Online.OFFLINE))
        res = ResizeJob(dev, 2 * GiB, sched, guest).wait(timeout=5)
        assert res.outcome is Outcome.NO_SPACE and res.plugged == GiB
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched)
        dev.set_requested_size(256 * MiB)
        DirectChannel(dev).send(Request(0, dev.addr, 1))  # makes the guest's PLUG fail
        res = ResizeJob(dev, 256 * MiB, sched, guest).wait(timeout=5)
        assert res.outcome is Outcome.GUEST_BROKEN
    with machine_with() as m:
        dev = m.virtio_mem("vmem0")
        res = ResizeJob(dev, 256 * MiB, Scheduler(), None).wait(timeout=5)
        assert res.outcome is Outcome.NO_GUEST


def test_stopping_short_ends_the_job_with_the_guests_reason() -> None:
    with machine_with(size="32G") as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched, GuestOptions(boot_memory_end=1025 * GiB))  # 1 GiB blocks
        res = ResizeJob(dev, 21 * GiB + 512 * MiB, sched, guest).wait(timeout=3600)
        assert res.outcome is Outcome.NO_SPACE and res.plugged == 21 * GiB
        assert res.elapsed < 3600  # it ends when the guest stops, not at the timeout
        assert "the next Linux memory block (1 GiB at " in res.reason
    with machine_with(extra=",block-size=1M") as m:
        dev = m.virtio_mem("vmem0")
        sched = Scheduler()
        guest = boot(dev, sched)
        res = ResizeJob(dev, 5 * MiB, sched, guest).wait(timeout=3600)
        assert res.outcome is Outcome.STOPPED_SHORT and res.elapsed < 3600
        assert "the rest (1 MiB) is less than one sub-block (2 MiB)" in res.reason
