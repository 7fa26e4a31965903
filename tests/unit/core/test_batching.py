"""MicroBatcher: one flush per tick, results in order, nothing lost to a caller that left."""

from __future__ import annotations

import asyncio

import pytest

from vmpool.core.batching import MicroBatcher


class Flush:
    """A flush that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return [i * 10 for i in items]


async def test_calls_of_one_tick_go_in_one_flush_and_get_their_own_results() -> None:
    flush = Flush()
    batcher: MicroBatcher[int, int] = MicroBatcher(flush)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert flush.batches == [[0, 1, 2, 3, 4]]
    assert await batcher.submit(7) == 70  # a later call: the next flush
    assert flush.batches[-1] == [7]


async def test_max_batch_splits_flushes() -> None:
    flush = Flush()
    batcher: MicroBatcher[int, int] = MicroBatcher(flush, max_batch=2)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert flush.batches == [[0, 1], [2, 3], [4]]


async def test_a_failed_flush_gives_each_caller_its_own_exception() -> None:
    flush = Flush()
    flush.error = ValueError("database said no")
    batcher: MicroBatcher[int, int] = MicroBatcher(flush)
    got = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(e, ValueError) and str(e) == "database said no" for e in got)
    assert len({id(e) for e in got}) == 3
    assert all(e.__cause__ is flush.error for e in got if isinstance(e, BaseException))


async def test_a_caller_that_leaves_during_the_flush_has_its_result_abandoned() -> None:
    flush = Flush()
    flush.release.clear()
    abandoned: list[tuple[int, int]] = []

    async def on_abandoned(item: int, result: int) -> None:
        abandoned.append((item, result))

    batcher: MicroBatcher[int, int] = MicroBatcher(flush, on_abandoned=on_abandoned)
    leaver = asyncio.ensure_future(batcher.submit(1))
    stayer = asyncio.ensure_future(batcher.submit(2))
    await flush.started.wait()
    leaver.cancel()  # e.g. its deadline passed while the statement ran
    flush.release.set()
    assert await stayer == 20
    with pytest.raises(asyncio.CancelledError):
        await leaver
    await batcher.drain()
    assert abandoned == [(1, 10)]


async def test_a_caller_cancelled_after_its_result_was_set_has_it_abandoned() -> None:
    abandoned: list[tuple[int, int]] = []
    callers: list[asyncio.Future[int]] = []

    async def flush(items: list[int]) -> list[int]:
        await asyncio.sleep(0)
        # Runs after the results are set and before the caller resumes: the
        # cancellation lands on a caller whose future already holds its result.
        asyncio.get_running_loop().call_soon(callers[0].cancel)
        return [i * 10 for i in items]

    async def on_abandoned(item: int, result: int) -> None:
        abandoned.append((item, result))

    batcher: MicroBatcher[int, int] = MicroBatcher(flush, on_abandoned=on_abandoned)
    callers.append(asyncio.ensure_future(batcher.submit(3)))
    with pytest.raises(asyncio.CancelledError):
        await callers[0]
    await batcher.drain()
    assert abandoned == [(3, 30)]


async def test_without_an_abandon_handler_a_leaver_costs_the_others_nothing() -> None:
    """No on_abandoned: the result of a caller that left is dropped, the callers
    after it in the same flush still get theirs, and nothing reaches the loop's
    exception handler."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        flush = Flush()
        flush.release.clear()
        batcher: MicroBatcher[int, int] = MicroBatcher(flush)
        leaver = asyncio.ensure_future(batcher.submit(1))
        stayer = asyncio.ensure_future(batcher.submit(2))
        await flush.started.wait()
        leaver.cancel()
        flush.release.set()
        assert await asyncio.wait_for(stayer, 10) == 20
        await batcher.drain()
        assert leaver.cancelled()
        assert flush.batches == [[1, 2]], "the leaver's item was flushed all the same"
        assert await batcher.submit(3) == 30
    finally:
        loop.set_exception_handler(None)
    assert reported == []
