"""One machine, several threads: the machine lock, and the thread that runs the guests.

``memslots run`` serves QMP and metrics on an asyncio loop while the guests run in a thread of
their own, so that neither a resize of thousands of requests nor a vhost-user back-end that does
not answer holds up the monitor. Whatever reads or changes the machine holds the
:class:`MachineLock`: the guests' thread while it runs a guest, and the monitor's commands and
metric scrapes, which :meth:`MachineRunner.run` executes in a worker thread so that a command
waiting for a back-end does not block the loop either. Before each request a guest sends, its
thread hands the lock to whoever waits for it (:meth:`MachineRunner.checkpoint`): a command waits
for one request at most, and never sees a half-applied change.

:meth:`MachineRunner.pause` holds the guests between two requests until :meth:`~MachineRunner.
resume` (while paused, a thread that holds the lock knows that no guest request is in flight or
will start); :meth:`~MachineRunner.wait_idle` waits until no guest callback runs at all (a
migration saves the guest then); :meth:`~MachineRunner.stop` ends them for good, after
interrupting any wait for a back-end.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

from memslots.errors import MonitorError
from memslots.guest.sched import ThreadScheduler

log = logging.getLogger("memslots.machine.runner")

T = TypeVar("T")


class MachineLock:
    """A lock that serves its waiters in arrival order.

    ``threading.Lock`` promises no order, so the guests' thread, which gives the lock up and
    takes it again between every two requests, could starve the monitor. Here the holder hands
    the lock straight to the longest waiter. Like ``threading.Lock``, any thread may release it.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self) -> None:
        """Wait for the lock (behind those already waiting) and take it."""
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        turn.acquire()  # released by the holder that hands the lock over to us

    def release(self) -> None:
        """Give the lock to the longest waiter, or free it."""
        with self._mutex:
            if not self._held:
                raise RuntimeError("release of a MachineLock that is not held")
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False

    @property
    def contended(self) -> bool:
        """True while someone waits for the lock."""
        return bool(self._waiters)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class GuestsStopped(BaseException):
    """Raised at a checkpoint of the guests' thread once the guests are stopped for good.

    A BaseException, so that the guest model's ``except Exception`` lets it through: the guest
    is torn down between two requests, as a vCPU thread is.
    """


def _nothing() -> None:
    pass


class MachineRunner:
    """The machine lock, the guests' thread, and a worker thread for the monitor's calls.

    ``interrupt`` is called once by :meth:`stop` to end any wait for a back-end (the runtime
    shuts the back-ends' connections down), so that stopping takes one request at most.
    """

    def __init__(self, *, interrupt: Callable[[], None] = _nothing) -> None:
        self.lock = MachineLock()
        self._interrupt = interrupt
        self._state = threading.Condition()
        self._paused = False
        self._stopping = False
        self._in_callback = False
        self._sched: ThreadScheduler | None = None
        self._guests: threading.Thread | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="machine")

    # -- the guests ----------------------------------------------------------------------------

    def start_guests(self, sched: ThreadScheduler) -> None:
        """Start the thread that runs ``sched``'s callbacks, each holding the lock."""
        self._sched = sched
        self._guests = threading.Thread(target=self._run_guests, name="guests", daemon=True)
        self._guests.start()

    def _run_guests(self) -> None:
        assert self._sched is not None
        while (fn := self._sched.take(self._taken)) is not None:
            try:
                with self.lock:
                    try:
                        self.checkpoint()
                        fn()
                    except GuestsStopped:
                        return
                    except Exception:
                        # As the asyncio loop that used to run the guests did: log, go on.
                        log.exception("a guest callback failed")
            finally:
                with self._state:
                    self._in_callback = False
                    self._state.notify_all()

    def _taken(self) -> None:
        with self._state:
            self._in_callback = True

    def wait_idle(self) -> None:
        """Pause the scheduler and wait until the guests' thread runs no callback: the guest
        model's state is then all in its objects, none of it on that thread's stack, and can be
        saved. Guests held by :meth:`pause` run on to the end of their callback (the devices
        answer BUSY meanwhile during a migration). Call it without holding the lock."""
        if self._sched is not None:
            self._sched.pause()  # a callback taken before this has marked itself already
        with self._state:
            self._paused = False
            self._state.notify_all()
            self._state.wait_for(lambda: not self._in_callback or self._stopping)

    def checkpoint(self) -> None:
        """Before a guest request: let waiting threads in, honour pause and stop.

        Called with the lock held. Only the guests' thread yields here: a command that drives a
        guest itself keeps the lock to the end. Raises :class:`GuestsStopped` once stopped.
        """
        if threading.current_thread() is not self._guests:
            return
        if self._stopping:
            raise GuestsStopped
        if not (self._paused or self.lock.contended):
            return
        self.lock.release()
        try:
            with self._state:
                self._state.wait_for(lambda: not self._paused or self._stopping)
        finally:
            self.lock.acquire()
        if self._stopping:
            raise GuestsStopped

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused

    def pause(self) -> None:
        """Hold the guests at their next checkpoint (between two requests) until :meth:`resume`.

        Returns at once; a thread that then takes the lock runs with no guest request in flight,
        and none starts until :meth:`resume`.
        """
        with self._state:
            self._paused = True

    def resume(self) -> None:
        """Let the guests go on."""
        with self._state:
            self._paused = False
            self._state.notify_all()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    # -- the monitor's calls -------------------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` holding the lock (from any thread but the guests'); refused once stopped."""
        with self.lock:
            if self._stopping:
                raise MonitorError("the machine is shutting down")
            return fn()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` holding the lock in the worker thread, without blocking the event loop."""
        if self._stopping:
            raise MonitorError("the machine is shutting down")
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.call, fn)

    # -- shutdown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the guests for good and wait for the threads; later calls are refused.

        Back-end waits are interrupted first, so the guests' thread reaches its next checkpoint
        within one request and the worker finishes the call it runs.
        """
        with self._state:
            self._stopping = True
            self._state.notify_all()
        self._interrupt()
        if self._sched is not None:
            self._sched.close()
        if self._guests is not None:
            self._guests.join()
        self._worker.shutdown(wait=True)  # calls still queued refuse themselves
