"""A dedicated connection per process: LISTEN for wake-ups, and hold the leader lock.

NOTIFY is only a wake-up hint; whoever is woken re-reads the tables. The
leader is whoever holds a session-level advisory lock: if its process dies,
PostgreSQL drops the session and another process takes the lock on its next try.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from vmpool.store.errors import UNAVAILABLE_ERRORS

log = structlog.get_logger("vmpool.control")

LEADER_LOCK = 0x766D706F6F6C01
HEARTBEAT_EVERY = 5  # leader: check the session every this many intervals


class Control:
    def __init__(
        self,
        url: str,
        interval: float,
        on_wake: Callable[[], None],
        on_assigned: Callable[[str], None],
        on_leadership: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self._url = url
        self._interval = interval
        self._on_wake = on_wake
        self._on_assigned = on_assigned
        self._on_leadership = on_leadership
        self._leader = False
        self._conn: asyncpg.Connection | None = None

    def is_leader(self) -> bool:
        return self._leader

    def _set_leader(self, value: bool) -> None:
        if value != self._leader:
            self._leader = value
            log.info("leadership " + ("acquired" if value else "lost"))
            self._on_leadership(value)

    def _wake(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._on_wake()

    def _assigned(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._on_assigned(payload)

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                await self._session(stop)
                delay = 0.5
            except UNAVAILABLE_ERRORS as err:
                log.warning("control connection lost", error=f"{type(err).__name__}: {err}")
            finally:
                self._set_leader(False)
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)

    async def _session(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(
            self._url, timeout=5, server_settings={"application_name": "vmpool-control"}
        )
        self._conn = conn
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _c: closed.set())
        await conn.add_listener("vmpool_wake", self._wake)
        await conn.add_listener("vmpool_assigned", self._assigned)
        self._on_wake()  # we may have missed notifications while disconnected
        beats = 0
        while not stop.is_set() and not closed.is_set():
            if not self._leader:
                got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK)
                self._set_leader(bool(got))
            else:
                beats += 1
                if beats % HEARTBEAT_EVERY == 0:
                    await conn.fetchval("SELECT 1", timeout=5)
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(closed.wait())]
            try:
                await asyncio.wait(waiters, timeout=self._interval, return_when="FIRST_COMPLETED")
            finally:
                for w in waiters:
                    w.cancel()
        if closed.is_set() and not stop.is_set():
            raise asyncpg.exceptions.ConnectionDoesNotExistError("control connection closed")

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            try:
                await asyncio.wait_for(self._conn.close(), 2)
            except (*UNAVAILABLE_ERRORS,):
                self._conn.terminate()
        self._conn = None
