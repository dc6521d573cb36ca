"""The machine lock and the guests' thread: order of turns, pause, stop (no wall-clock bounds)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from memslots.errors import MonitorError
from memslots.guest.sched import ThreadScheduler
from memslots.machine.runner import MachineLock, MachineRunner

WAIT = 10.0


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_lock_serves_waiters_in_arrival_order() -> None:
    lock = MachineLock()
    order: list[str] = []
    lock.acquire()

    def take(name: str) -> None:
        with lock:
            order.append(name)

    threads: list[threading.Thread] = []
    for name in ("first", "second", "third"):
        t = threading.Thread(target=take, args=(name,))
        t.start()
        threads.append(t)
        wait_for(lambda: len(lock._waiters) == len(threads))  # queued before the next starts
    assert lock.contended
    lock.release()
    for t in threads:
        t.join(WAIT)
    assert order == ["first", "second", "third"]
    assert not lock.contended
    with pytest.raises(RuntimeError):
        lock.release()


class Pass:
    """A guest pass of ``n`` requests on the runner's guests' thread; each request is a
    checkpoint followed by a record of its number."""

    def __init__(self, runner: MachineRunner, sched: ThreadScheduler, n: int) -> None:
        self.runner = runner
        self.n = n
        self.sent: list[int] = []
        self.go = threading.Event()
        self.stopped_at: int | None = None
        sched.call_soon(self.run)

    def run(self) -> None:
        self.go.wait(WAIT)
        for i in range(self.n):
            try:
                self.runner.checkpoint()
            except BaseException:
                self.stopped_at = i
                raise
            self.sent.append(i)


def started(n: int, interrupt: Callable[[], None] | None = None) -> tuple[MachineRunner, Pass]:
    runner = MachineRunner(interrupt=interrupt) if interrupt else MachineRunner()
    sched = ThreadScheduler()
    guest = Pass(runner, sched, n)
    runner.start_guests(sched)
    return runner, guest


def test_a_call_gets_the_machine_between_two_guest_requests() -> None:
    # A pass that would not end by itself, however slowly the host runs this thread.
    runner, guest = started(10**12)
    try:
        seen: list[int] = []

        def look() -> None:
            seen.append(len(guest.sent))
            time.sleep(0.02)  # room for a guest that ignored the lock to move on
            seen.append(len(guest.sent))

        guest.go.set()
        wait_for(lambda: len(guest.sent) > 10)
        runner.call(look)
        # The call ran in the middle of the pass, and no request ran while it held the lock.
        assert 10 < seen[0] == seen[1]
        wait_for(lambda: len(guest.sent) > seen[1] + 10)  # the pass went on afterwards
    finally:
        runner.stop()
    assert guest.stopped_at is not None  # stopped between two requests, not finished
    assert guest.sent == list(range(len(guest.sent)))  # the pass itself went on unchanged


def test_run_from_the_loop_does_not_block_it() -> None:
    runner, guest = started(1)
    blocker = threading.Event()
    ticks: list[float] = []

    async def main() -> object:
        async def ticker() -> None:
            while not blocker.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.001)

        def hold() -> str:
            wait_for(lambda: len(ticks) > 5)  # the loop ticks on while we hold the machine
            return "done"

        task = asyncio.create_task(ticker())
        result = await runner.run(hold)
        blocker.set()
        await task
        return result

    try:
        guest.go.set()
        assert asyncio.run(main()) == "done"
    finally:
        runner.stop()


def test_pause_holds_the_guests_between_two_requests() -> None:
    runner, guest = started(10**12)
    try:
        guest.go.set()
        wait_for(lambda: len(guest.sent) > 10)
        runner.pause()
        assert runner.paused
        # Once we hold the lock, no request is in flight and none starts.
        at = runner.call(lambda: len(guest.sent))
        with runner.lock:
            time.sleep(0.05)
            assert len(guest.sent) == at
        time.sleep(0.05)
        assert len(guest.sent) == at
        runner.resume()
        wait_for(lambda: len(guest.sent) > at + 10)
    finally:
        runner.stop()


def test_wait_idle_lets_a_held_callback_end_and_starts_no_other() -> None:
    runner = MachineRunner()
    sched = ThreadScheduler()
    guest = Pass(runner, sched, 50_000)
    later: list[str] = []
    runner.start_guests(sched)
    try:
        guest.go.set()
        wait_for(lambda: len(guest.sent) > 10)
        runner.pause()  # held in the middle of its pass
        sched.call_soon(lambda: later.append("ran"))
        runner.wait_idle()
        # The held pass ran to its end; the callback queued behind it did not start.
        assert guest.sent == list(range(guest.n)) and later == [] and sched.paused
        sched.resume()
        wait_for(lambda: later == ["ran"])
    finally:
        runner.stop()


def test_stop_ends_the_guests_between_two_requests_and_refuses_later_calls() -> None:
    interrupted: list[bool] = []
    runner, guest = started(10_000_000, interrupt=lambda: interrupted.append(True))
    guest.go.set()
    wait_for(lambda: len(guest.sent) > 10)
    runner.stop()
    assert interrupted == [True]
    assert guest.stopped_at is not None and guest.sent == list(range(guest.stopped_at))
    with pytest.raises(MonitorError, match="shutting down"):
        runner.call(lambda: None)

    async def late() -> None:
        await runner.run(lambda: None)

    with pytest.raises(MonitorError, match="shutting down"):
        asyncio.run(late())


def test_checkpoint_elsewhere_never_yields() -> None:
    """A command that drives a guest itself keeps the lock: checkpoints outside the guests'
    thread do nothing, even with a waiter and while paused."""
    runner = MachineRunner()
    runner.pause()
    waited: list[str] = []
    with runner.lock:
        waiter = threading.Thread(target=lambda: runner.call(lambda: waited.append("in")))
        waiter.start()
        wait_for(lambda: runner.lock.contended)
        runner.checkpoint()
        assert waited == []
    waiter.join(WAIT)
    assert waited == ["in"]
    runner.stop()
