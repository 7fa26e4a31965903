"""Coalesce calls made in the same event-loop tick into one flush (one statement).

Under load, many RPC handlers reach the same query in one tick; sending them as
one statement costs one round trip and one commit instead of one each. The
batch adds no loop hop: the flush task created by the first call of a tick
starts on the next tick, taking every call made meanwhile, and each caller's
own future is resolved straight from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 256


class MicroBatcher(Generic[T, R]):
    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        """``flush(items)`` returns one result per item, in order."""
        self._flush = flush
        self._open: list[tuple[T, asyncio.Future[R]]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """Add ``item`` to the next flush and wait for its result (or the flush's error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if self._open is None or len(self._open) >= MAX_BATCH:
            self._open = []
            task = loop.create_task(self._run(self._open))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._open.append((item, future))
        return await future

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        if self._open is batch:
            self._open = None  # closed: a later call starts the next batch
        try:
            results = await self._flush([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as err:  # the flush failed: each caller gets its error
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # a caller that gave up is skipped
                future.set_result(result)
