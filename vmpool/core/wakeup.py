"""One task's idle wait, ended by another with a value or by a timer: one
future and one timer handle, no task in between (an ``asyncio.Event`` under
``wait_for`` costs a task and three loop turns per wake-up)."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Wakeup(Generic[T]):
    def __init__(self) -> None:
        self._waiter: asyncio.Future[T] | None = None

    def wake(self, value: T) -> None:
        """End the wait in progress, if any, with ``value``."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    async def wait(self, timeout: float, timed_out: T) -> T:
        """Until wake(value) (value), or ``timed_out`` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout, self.wake, timed_out)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None
