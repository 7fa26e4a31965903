"""Coalesce calls made in the same event-loop tick into one flush (one statement).

Under load, many RPC handlers reach the same query in one tick; sending them as
one statement costs one round trip and one commit instead of one each. The
batch adds no loop hop: the flush task created by the first call of a tick
starts on the next tick, taking every call made meanwhile, and each caller's
own future is resolved straight from it.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 256


def own_copy(err: BaseException) -> BaseException:
    """A copy of ``err`` for one caller (caused by the original): raising one
    exception object in N tasks would grow one shared traceback N times."""
    try:
        clone = copy.copy(err)
    except Exception:  # an exception that cannot be copied: share it
        return err
    clone.__cause__ = err
    clone.__traceback__ = None
    return clone


class MicroBatcher(Generic[T, R]):
    """``flush(items)`` returns one result per item, in order.

    A caller that gives up (cancelled: deadline, disconnect, shutdown) does not
    stop the flush its item is in: the statement may commit anyway. Its result
    then goes to ``on_abandoned(item, result)`` (e.g. to undo a claim nobody
    will receive), whether the caller left before the flush finished or after
    its result was set but before it could read it.
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[list[R]]],
        *,
        on_abandoned: Callable[[T, R], Coroutine[Any, Any, None]] | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._flush = flush
        self._on_abandoned = on_abandoned
        self._max_batch = max_batch
        self._open: list[tuple[T, asyncio.Future[R]]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def submit(self, item: T) -> R:
        """Add ``item`` to the next flush and wait for its result (or the flush's error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if self._open is None or len(self._open) >= self._max_batch:
            self._open = []
            self._own(self._run(self._open))
        self._open.append((item, future))
        try:
            return await future
        except asyncio.CancelledError:
            # Cancelled after the result was set, before this task ran again.
            if future.done() and not future.cancelled() and future.exception() is None:
                self._abandon(item, future.result())
            raise

    def _abandon(self, item: T, result: R) -> None:
        if self._on_abandoned is not None:
            self._own(self._on_abandoned(item, result))

    async def drain(self) -> None:
        """Wait for flushes and abandon handlers in progress (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        if self._open is batch:
            self._open = None  # closed: a later call starts the next batch
        try:
            results = await self._flush([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as err:  # the flush failed: each caller gets its own copy
            for _, future in batch:
                if not future.done():
                    future.set_exception(own_copy(err))
            return
        for (item, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller gave up while the flush ran
                self._abandon(item, result)
            else:
                future.set_result(result)
