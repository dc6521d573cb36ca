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

    :meth:`pause` stops the guest's clock, as a stopped VM's virtual clock stands still
    (QMP ``stop``, a migration's switch-over): nothing runs and no time passes for the guest
    until :meth:`resume`, so a 50 s retry timer armed before a pause still has its remaining
    time afterwards.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self._t0 = loop.time()
        self._paused_at: float | None = None
        #: Callbacks not yet run, with their loop handles (None while paused).
        self._pending: dict[int, tuple[float, Callable[[], None], asyncio.TimerHandle | None]] = {}

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused_at is not None

    def now(self) -> float:
        """Guest seconds since the scheduler was created (paused time does not count)."""
        end = self._paused_at if self._paused_at is not None else self.loop.time()
        return end - self._t0

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` on the loop at guest time ``when`` (seconds since creation)."""
        when = max(when, self.now())
        key = next(self._seq)
        self._pending[key] = (when, fn, self._arm(key, when, fn))

        def cancel() -> None:
            entry = self._pending.pop(key, None)
            if entry is not None and entry[2] is not None:
                entry[2].cancel()

        return Timer(when, cancel)

    def _arm(self, key: int, when: float, fn: Callable[[], None]) -> asyncio.TimerHandle | None:
        if self._paused_at is not None:
            return None

        def run() -> None:
            if self._pending.pop(key, None) is not None:
                fn()

        return self.loop.call_at(self._t0 + when, run)

    def pause(self) -> None:
        """Stop the guest's clock and hold every callback until :meth:`resume`."""
        if self._paused_at is not None:
            return
        self._paused_at = self.loop.time()
        for key, (when, fn, handle) in list(self._pending.items()):
            if handle is not None:
                handle.cancel()
            self._pending[key] = (when, fn, None)

    def resume(self) -> None:
        """Start the clock again where it stopped; held callbacks run when they are due."""
        if self._paused_at is None:
            return
        self._t0 += self.loop.time() - self._paused_at
        self._paused_at = None
        for key, (when, fn, _) in sorted(self._pending.items(), key=lambda kv: kv[1][0]):
            self._pending[key] = (when, fn, self._arm(key, when, fn))

    def next_due(self) -> float | None:
        """Guest time of the next pending callback, if any."""
        return min((when for when, _, _ in self._pending.values()), default=None)

    def step(self) -> bool:
        """Not available: the loop runs the callbacks."""
        raise NotImplementedError("a LoopScheduler is driven by its asyncio loop")
