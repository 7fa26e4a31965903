"""Coalesce calls made in the same event-loop tick into one flush (one statement).

Under load, many RPC handlers reach the same query in one tick; sending them as
one statement costs one round trip and one commit instead of one each.
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
        self._items: list[T] = []
        self._batch: asyncio.Future[list[R]] | None = None
        self._tasks: set[asyncio.Task[list[R]]] = set()

    async def submit(self, item: T) -> R:
        """Add ``item`` to the next flush and wait for its result (or the flush's error)."""
        if self._batch is None:
            loop = asyncio.get_running_loop()
            self._batch = loop.create_future()
            self._items = []
            loop.call_soon(self._start, self._batch, self._items)
        batch = self._batch
        index = len(self._items)
        self._items.append(item)
        if len(self._items) >= MAX_BATCH:
            self._batch = None  # full: the next call starts another
        results = await asyncio.shield(batch)
        return results[index]

    def _start(self, batch: asyncio.Future[list[R]], items: list[T]) -> None:
        if self._batch is batch:
            self._batch = None
        task = asyncio.ensure_future(self._flush(items))
        self._tasks.add(task)

        def done(t: asyncio.Task[list[R]]) -> None:
            self._tasks.discard(t)
            if batch.done():
                return
            if t.cancelled():
                batch.cancel()
            elif (err := t.exception()) is not None:
                batch.set_exception(err)
            else:
                batch.set_result(t.result())

        task.add_done_callback(done)
