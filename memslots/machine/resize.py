"""Resize as a job: set ``requested-size``, then wait until the guest gets there or cannot.

``ResizeJob.wait(timeout)`` returns when ``plugged == requested``, or with the reason the guest
stopped, in the guest driver's own words (``LinuxGuest.stop_reason``): its driver is broken (the
device answered ERROR), the device needs a reset, the guest ran out of space (ENOSPC: the next
memory block past the usable region, or too much offline memory), the rest is less than the
driver's unit, or it is backing off after BUSY or memory it could not unplug (with the time of
its next retry) when the timeout passed. Progress callbacks see every
size change; the time is the guest's scheduler's (simulated in tests and simulations).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from memslots.devices.memory_device import MemoryDevice
from memslots.devices.virtio_mem.device import VirtioMem
from memslots.guest.linux import LinuxGuest
from memslots.guest.sched import Scheduler
from memslots.sizes import format_size


class Outcome(enum.Enum):
    """How a resize job ended (or where it stands when the timeout passed)."""

    REACHED = "reached"
    GUEST_BROKEN = "guest-broken"
    DEVICE_NEEDS_RESET = "device-needs-reset"
    NO_SPACE = "no-space"
    STOPPED_SHORT = "stopped-short"
    BACKOFF = "backoff"
    TIMEOUT = "timeout"
    NO_GUEST = "no-guest"


@dataclass(frozen=True)
class ResizeResult:
    """Where a job stands: outcome, sizes, elapsed (scheduler) time and a sentence for people."""

    outcome: Outcome
    requested: int
    plugged: int
    elapsed: float
    reason: str

    @property
    def ok(self) -> bool:
        """True when the requested size was reached."""
        return self.outcome is Outcome.REACHED


ProgressCallback = Callable[[int, int], None]


class ResizeJob:
    """One resize of one virtio-mem device, driven by its guest."""

    def __init__(
        self,
        dev: VirtioMem,
        size: int,
        sched: Scheduler,
        guest: LinuxGuest | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.dev = dev
        self.target = size
        self.sched = sched
        self.guest = guest
        self.started = sched.now()
        self._progress = on_progress
        self._listener = self._on_size_change
        if on_progress is not None:
            dev.size_change_listeners.append(self._listener)
        # Validates first (multiple of block-size, within the backend): raises PropertyError.
        dev.set_requested_size(size)

    def _on_size_change(self, dev: MemoryDevice, size: int) -> None:
        if self._progress is not None:
            self._progress(size, self.target)

    @property
    def done(self) -> bool:
        """True once the device's plugged size equals the requested size."""
        return self.dev.size == self.dev.requested_size

    def _stuck(self) -> bool:
        g = self.guest
        # Idle with a reason: nothing will move it until the request changes.
        return g is None or g.broken or g.hung or (g.idle and g.stop_reason is not None)

    def wait(self, timeout: float) -> ResizeResult:
        """Run the guest until done, stuck, or ``timeout`` seconds have passed."""
        deadline = self.sched.now() + timeout
        self.sched.run_until(lambda: self.done or self._stuck(), deadline)
        finished = self.done or self._stuck()
        if finished and self._listener in self.dev.size_change_listeners:
            self.dev.size_change_listeners.remove(self._listener)
        return self.result()

    def result(self) -> ResizeResult:
        """The job's current standing."""
        dev, g = self.dev, self.guest
        req, plugged = dev.requested_size, dev.size
        elapsed = self.sched.now() - self.started
        sizes = f"plugged {format_size(plugged)} of {format_size(req)} requested"

        def res(outcome: Outcome, why: str) -> ResizeResult:
            return ResizeResult(outcome, req, plugged, elapsed, f"{why} ({sizes})")

        if self.done:
            return res(Outcome.REACHED, f"'{dev.label}' reached the requested size")
        if g is None:
            return res(Outcome.NO_GUEST, f"no guest driver is attached to '{dev.label}'")
        if g.broken:
            return res(
                Outcome.GUEST_BROKEN,
                f"the guest's driver for '{dev.label}' is broken: the device answered ERROR",
            )
        if g.hung or dev.needs_reset:
            return res(
                Outcome.DEVICE_NEEDS_RESET,
                f"'{dev.label}' needs a reset after a protocol violation; the guest waits",
            )
        why = g.stop_reason
        if g.stopped_no_space:
            return res(
                Outcome.NO_SPACE, f"the guest stopped plugging '{dev.label}': {why or 'no space'}"
            )
        if g.timer_due is not None:
            return res(
                Outcome.BACKOFF,
                f"the guest is backing off ({why or 'BUSY or memory it could not unplug'}); "
                f"next retry at t={g.timer_due:.0f}s",
            )
        if g.idle and why is not None:
            return res(Outcome.STOPPED_SHORT, f"the guest stopped short of it: {why}")
        return res(Outcome.TIMEOUT, f"'{dev.label}' did not reach the requested size in time")
