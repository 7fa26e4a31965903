"""In-process wake-ups for Lease calls waiting on a reservation (x-vmpool-wait)."""

from __future__ import annotations

import asyncio
import contextlib


class Waiters:
    def __init__(self, limit: int = 500) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        self.limit = limit  # limits.max_waiting_calls
        self.holding = 0

    def admit(self) -> bool:
        """Take a place for one waiting call; False when ``limit`` calls wait already."""
        if self.holding >= self.limit:
            return False
        self.holding += 1
        return True

    def leave(self) -> None:
        self.holding -= 1

    def wake(self, key: str) -> None:
        for event in self._events.get(key, ()):
            event.set()

    def wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()

    async def wait(self, key: str, timeout: float) -> bool:
        """Wait up to ``timeout`` s for ``wake(key)``; True if woken."""
        event = asyncio.Event()
        self._events.setdefault(key, set()).add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
            return event.is_set()
        finally:
            events = self._events[key]
            events.discard(event)
            if not events:
                del self._events[key]

    def __len__(self) -> int:
        return sum(len(v) for v in self._events.values())
