"""The simulated clock and the asyncio-loop scheduler."""

from __future__ import annotations

import asyncio

import pytest

from memslots.guest.sched import LoopScheduler, Scheduler


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


def test_loop_scheduler_runs_on_the_loop() -> None:
    async def go() -> list[str]:
        loop = asyncio.get_running_loop()
        s = LoopScheduler(loop)
        seen: list[str] = []
        done = asyncio.Event()

        def timer() -> None:
            seen.append("timer")
            done.set()

        s.call_at(s.now() + 0.02, timer)
        s.call_soon(lambda: seen.append("soon"))
        s.call_at(s.now() + 0.01, lambda: seen.append("cancelled")).cancel()
        await asyncio.wait_for(done.wait(), 5)
        with pytest.raises(NotImplementedError):
            s.step()
        return seen

    assert asyncio.run(go()) == ["soon", "timer"]
