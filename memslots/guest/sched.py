"""Time for guests and jobs: a simulated clock that jumps from event to event, or real time.

The Linux driver retries with timers of 50 s to 300 s; tests and simulations must not sleep
through them. Everything that waits asks a :class:`Scheduler` for the time and for callbacks; the
simulated scheduler runs callbacks in time order and jumps the clock forward between them. A
running machine (``memslots run``) uses :class:`ThreadScheduler`: real time, its callbacks taken
by the thread that runs the guests.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(order=True)
class _Event:
    when: float
    seq: int
    fn: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class Timer:
    """A handle to a scheduled callback."""

    def __init__(self, when: float, cancel: Callable[[], None]) -> None:
        self.when = when
        self._cancel = cancel

    def cancel(self) -> None:
        """The callback will not run."""
        self._cancel()


class Scheduler:
    """A simulated clock with callbacks; ``run_until`` drives it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._queue: list[_Event] = []
        self._seq = itertools.count()

    def now(self) -> float:
        """The current simulated time in seconds."""
        return self._now

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` at simulated time ``when`` (not before the current time)."""
        event = _Event(max(when, self._now), next(self._seq), fn)
        heapq.heappush(self._queue, event)

        def cancel() -> None:
            event.cancelled = True

        return Timer(event.when, cancel)

    def call_soon(self, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` at the current time, after what is already due now."""
        return self.call_at(self.now(), fn)

    def next_due(self) -> float | None:
        """Time of the next pending callback, if any."""
        while self._queue and self._queue[0].cancelled:
            heapq.heappop(self._queue)
        return self._queue[0].when if self._queue else None

    def step(self) -> bool:
        """Run the next pending callback (jumping the clock to it); False if none is pending."""
        if self.next_due() is None:
            return False
        event = heapq.heappop(self._queue)
        self._now = max(self._now, event.when)
        event.fn()
        return True

    def run_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Run callbacks until ``done()`` or the clock would pass ``deadline``.

        Returns ``done()``. The clock ends at the deadline if nothing more is due before it.
        """
        while not done():
            due = self.next_due()
            if due is None or due > deadline:
                self._now = max(self._now, deadline)
                return done()
            self.step()
        return True

    def advance(self, seconds: float) -> None:
        """Run everything due in the next ``seconds`` and move the clock that far."""
        self.run_until(lambda: False, self._now + seconds)


class ThreadScheduler(Scheduler):
    """Real time for guests that run in a thread of their own (``memslots run``).

    :meth:`call_at` may be called from any thread (a device tells its guest of a config
    change from whichever thread changed it); the guests' thread takes the callbacks as they
    fall due with :meth:`take`. Simulated-time driving (``step``, ``run_until``) is not
    available here.

    :meth:`pause` stops the guest's clock, as a stopped VM's virtual clock stands still
    (QMP ``stop``, a migration's switch-over): no callback is taken and no time passes for
    the guest until :meth:`resume`, so a 50 s retry timer armed before a pause still has its
    remaining time afterwards.
    """

    def __init__(self) -> None:
        super().__init__()
        self._t0 = time.monotonic()
        self._paused_at: float | None = None
        self._cond = threading.Condition()
        self._closed = False

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused_at is not None

    def now(self) -> float:
        """Guest seconds since the scheduler was created (paused time does not count)."""
        end = self._paused_at if self._paused_at is not None else time.monotonic()
        return end - self._t0

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` at guest time ``when`` (seconds since creation) on the guests' thread."""
        with self._cond:
            timer = super().call_at(max(when, self.now()), fn)
            self._cond.notify()
        return timer

    def pause(self) -> None:
        """Stop the guest's clock; no callback is taken until :meth:`resume` (one that runs
        now runs to its end)."""
        with self._cond:
            if self._paused_at is None:
                self._paused_at = time.monotonic()

    def resume(self) -> None:
        """Start the clock again where it stopped; held callbacks run when they are due."""
        with self._cond:
            if self._paused_at is not None:
                self._t0 += time.monotonic() - self._paused_at
                self._paused_at = None
                self._cond.notify_all()

    def take(self, on_take: Callable[[], None] | None = None) -> Callable[[], None] | None:
        """Wait until a callback is due and return it; None once :meth:`close` was called.
        ``on_take`` runs before it is returned, atomically with respect to :meth:`pause`."""
        with self._cond:
            while not self._closed:
                due = None if self._paused_at is not None else self.next_due()
                wait = None if due is None else due - self.now()
                if wait is not None and wait <= 0:
                    if on_take is not None:
                        on_take()
                    return heapq.heappop(self._queue).fn
                self._cond.wait(wait)
            return None

    def close(self) -> None:
        """Make :meth:`take` return None, now and from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def step(self) -> bool:
        """Not available: the guests' thread takes the callbacks."""
        raise NotImplementedError("a ThreadScheduler's callbacks are taken by the guests' thread")
