"""vmpool.core.wakeup: a wait ended by a value or by its timer, and nothing else."""

from __future__ import annotations

import asyncio

from vmpool.core.wakeup import Wakeup


async def test_a_wake_ends_the_wait_with_its_value() -> None:
    w: Wakeup[str] = Wakeup()
    waiting = asyncio.ensure_future(w.wait(60, "timed out"))
    await asyncio.sleep(0)
    w.wake("news")
    w.wake("later news")  # the wait has its answer: no error, no change
    assert await asyncio.wait_for(waiting, 5) == "news"


async def test_the_timer_ends_the_wait_and_a_later_wake_is_lost() -> None:
    w: Wakeup[bool] = Wakeup()
    assert await w.wait(0.01, True) is True
    w.wake(False)  # nobody waits: nothing to end, nothing kept for the next wait
    assert await w.wait(0.01, True) is True
