"""The simulated clock and the real-time scheduler of a guests' thread."""

from __future__ import annotations

import threading
import time

import pytest

from memslots.guest.sched import Scheduler, ThreadScheduler


def test_simulated_clock_jumps_between_events_in_order() -> None:
    s = Scheduler()
    seen: list[tuple[str, float]] = []
    s.call_at(300, lambda: seen.append(("late", s.now())))
    s.call_at(50, lambda: seen.append(("early", s.now())))
    cancelled = s.call_at(100, lambda: seen.append(("cancelled", s.now())))
    s.call_soon(lambda: seen.append(("now", s.now())))
    cancelled.cancel()
    assert s.next_due() == 0
    assert s.run_until(lambda: len(seen) == 2, deadline=1000)
    assert seen == [("now", 0), ("early", 50)]
    assert not s.run_until(lambda: False, deadline=200)
    assert s.now() == 200 and seen[-1] == ("early", 50)
    s.advance(200)
    assert seen[-1] == ("late", 300) and s.now() == 400
    assert not s.step()


def test_thread_scheduler_hands_due_callbacks_to_a_thread() -> None:
    s = ThreadScheduler()
    seen: list[str] = []

    def guests() -> None:
        while (fn := s.take()) is not None:
            fn()

    s.call_at(s.now() + 60, lambda: seen.append("timer"))
    s.call_soon(lambda: seen.append("soon"))
    s.call_at(s.now() + 0.01, lambda: seen.append("cancelled")).cancel()
    thread = threading.Thread(target=guests)
    thread.start()
    # Queued from another thread while the guests' thread waits for the timer: it wakes up.
    s.call_soon(lambda: seen.append("from a command"))
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert seen == ["soon", "from a command"]
    s.close()  # ends the wait for the timer, which never runs
    thread.join(10)
    assert not thread.is_alive() and seen == ["soon", "from a command"]
    assert s.take() is None
    with pytest.raises(NotImplementedError):
        s.step()


def test_a_paused_thread_scheduler_stops_the_guest_clock_and_holds_callbacks() -> None:
    s = ThreadScheduler()
    seen: list[tuple[str, float]] = []
    taken: list[int] = []

    def guests() -> None:
        while (fn := s.take(lambda: taken.append(1))) is not None:
            fn()

    thread = threading.Thread(target=guests)
    thread.start()
    s.pause()
    frozen = s.now()
    s.call_soon(lambda: seen.append(("held", s.now())))
    timer = s.call_at(frozen + 0.05, lambda: seen.append(("timer", s.now())))
    time.sleep(0.2)  # not a bound: time for a scheduler that ignored the pause to show it
    assert s.paused and s.now() == frozen and seen == [] and taken == []
    s.resume()
    # The 0.2 s of pause did not count (had it counted, the clock would be past frozen + 0.2).
    assert s.now() - frozen < 0.2
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    s.close()
    thread.join(10)
    # The timer kept its time: it ran when due, after the held callback.
    assert [name for name, _ in seen] == ["held", "timer"] and len(taken) == 2
    assert seen[1][1] >= timer.when == frozen + 0.05
    assert not s.paused
