"""One WatchLeases stream's place in the fan-out (vmpool.services.lease_events):
its bounded queue, its cursor, and how its task waits for news."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from vmpool.core.wakeup import Wakeup
from vmpool.domain.watch import Cursor, Event, Scope


class StreamEnded(Exception):
    """Why a stream was ended by the server: ``code`` is a grpc Status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class WatchLimits:
    max_streams: int = 1000
    max_streams_per_connection: int = 100
    buffer: int = 1000
    heartbeat_s: float = 15.0


# A queued item: (event, shared encoding or None, derived "expiring").
Item = tuple[Event, bytes | None, bool]


class Subscription:
    """One stream's place in the fan-out."""

    def __init__(self, scope: Scope, lead_s: int | None, peer: Any, position: Cursor) -> None:
        self.scope = scope
        self.lead_ns = None if lead_s is None else lead_s * 1_000_000_000
        self.peer = peer
        self.position = position  # after the last event delivered (or skipped)
        self.floor = position  # set on joining: only later events are offered to it
        self.queue: deque[Item] = deque()
        # The stream's task while its queue is empty: True when its heartbeat
        # is due, False when there is news.
        self._wakeup: Wakeup[bool] = Wakeup()
        self.ended: StreamEnded | None = None
        self.live = False
        self._batch = -1  # the last fetch queued here, and the queue's length then
        self._backlog = 0

    def push(self, item: Item, limit: int, batch: int | None = None) -> None:
        """Queue ``item``; end the stream if it is ``limit`` events behind.
        ``batch``: the number of the hub's fetch ``item`` came with. A fetch's
        events are all queued before the stream's task can take any, so the
        stream is judged by what it had not taken when the fetch came (a burst
        of more than ``limit`` events ended even the fastest reader); its queue
        stays under ``limit`` plus one fetch."""
        if self.ended is not None:
            return
        if batch is not None and batch != self._batch:
            self._batch, self._backlog = batch, len(self.queue)
        if (self._backlog if batch is not None else len(self.queue)) >= limit:
            self.end(
                StreamEnded(
                    "RESOURCE_EXHAUSTED",
                    f"watch: the stream fell {limit} events behind (a slow reader); "
                    f'resume with after="{self.position.encode()}"',
                )
            )
            return
        self.queue.append(item)
        self.wake(False)

    def end(self, why: StreamEnded) -> None:
        if self.ended is None:
            self.ended = why
            self.queue.clear()
            self.wake(False)

    def wake(self, beat: bool) -> None:
        self._wakeup.wake(beat)

    async def idle(self, heartbeat_s: float) -> bool:
        """Until news for this stream (False) or its heartbeat is due (True)."""
        if self.queue or self.ended is not None:
            return False
        return await self._wakeup.wait(heartbeat_s, True)

    def resume_hint(self) -> str:
        return f'resume with after="{self.position.encode()}"'
