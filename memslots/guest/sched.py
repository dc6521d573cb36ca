"""Time for guests and jobs: a simulated clock that jumps from event to event.

The Linux driver retries with timers of 50 s to 300 s; tests and simulations must not sleep
through them. Everything that waits asks a :class:`Scheduler` for the time and for callbacks; the
simulated scheduler runs callbacks in time order and jumps the clock forward between them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
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


class LoopScheduler(Scheduler):
    """Real time on an asyncio loop, for a long-running machine (``memslots run``).

    Callbacks run on the loop, so a guest driven by it never runs in the middle of a monitor
    command. Simulated-time driving (``step``, ``run_until``) is not available here.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self._t0 = loop.time()

    def now(self) -> float:
        """Seconds since the scheduler was created."""
        return self.loop.time() - self._t0

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` on the loop at ``when`` (seconds since creation)."""
        when = max(when, self.now())
        handle = self.loop.call_at(self._t0 + when, fn)
        return Timer(when, handle.cancel)

    def step(self) -> bool:
        """Not available: the loop runs the callbacks."""
        raise NotImplementedError("a LoopScheduler is driven by its asyncio loop")
