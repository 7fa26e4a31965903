"""Coalesce calls made in the same event-loop tick into one flush (one statement)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, flush: Callable[[list[T]], Awaitable[None]]) -> None:
        self._flush = flush
        self._items: list[T] = []
        self._batch: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> None:
        """Add ``item`` to the next flush and wait for it (its error is ours)."""
        if self._batch is None:
            loop = asyncio.get_running_loop()
            self._batch = loop.create_future()
            loop.call_soon(self._start)
        self._items.append(item)
        await asyncio.shield(self._batch)

    def _start(self) -> None:
        items, batch = self._items, self._batch
        self._items, self._batch = [], None
        assert batch is not None
        task = asyncio.ensure_future(self._run(items))
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if batch.done():
                return
            if t.cancelled():
                batch.cancel()
            elif (err := t.exception()) is not None:
                batch.set_exception(err)
            else:
                batch.set_result(None)

        task.add_done_callback(done)

    async def _run(self, items: list[T]) -> None:
        await self._flush(items)
