"""A dedicated connection per process: LISTEN for wake-ups, and leadership.

NOTIFY is only a wake-up hint; whoever is woken re-reads the tables.

Leadership has a term (migration 0021): the leader row names a holder, a term
and an expiry, in database time. A process takes the row once it has expired
(a new term), renews it every reconcile interval, and trusts itself only until
the start of its last successful renewal + ttl - margin, by its monotonic
clock. Every reconciler write checks the holder and term in its transaction
(``fence``), so writes of a leader that lost its term (paused, cut off, slow)
fail instead of racing the new leader's. ``release`` ends the term at once,
after the background work has stopped, so a follower takes over at its next try.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog

from vmpool.core.backoff import Retry
from vmpool.core.echo import echo
from vmpool.store import control_sql
from vmpool.store.connect import ConnectSettings, open_connection
from vmpool.store.errors import RETRYABLE_ERRORS, UNAVAILABLE_ERRORS, read_only

log = structlog.get_logger("vmpool.control")


RECONNECT_FIRST = 0.25  # seconds before the first new try after a lost session
RECONNECT_CAP = 4.0  # the backoff's ceiling: a failover's new primary is found soon


def holder_id() -> str:
    """Unique per process start: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Control:
    def __init__(
        self,
        url: str,
        interval: float,
        on_wake: Callable[[], None],
        on_assigned: Callable[[str], None],
        on_leadership: Callable[[bool], None] = lambda _: None,
        *,
        ttl: float = 10.0,
        lead: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
        settings: ConnectSettings | None = None,
        on_connected: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
        on_dropped: Callable[[bool], None] = lambda _: None,
    ) -> None:
        """``lead=False``: only LISTEN (a process that never runs the background work).
        ``on_connected(conn)``: run on every new session before LISTEN (checks
        of the server); ``on_dropped(read_only)``: a session was lost or found
        read-only, and is made anew."""
        self._url = url
        self._settings = settings or ConnectSettings()
        self._on_connected = on_connected
        self._on_dropped = on_dropped
        self._ttl = ttl
        # Renew well within the ttl: a few missed renewals are survived.
        self._interval = min(interval, ttl / 3)
        self._margin = min(1.0, ttl / 5)
        self._on_wake = on_wake
        self._on_assigned = on_assigned
        self._on_leadership = on_leadership
        self._lead = lead
        self._mono = monotonic
        self.holder = holder_id()
        self._leader = False
        self._term = 0
        self._trusted_until = 0.0
        self._conn: asyncpg.Connection | None = None
        self._locked = False  # this session holds the advisory lock LEADER_LOCK
        self._established = False  # the current session got as far as LISTEN

    def is_leader(self) -> bool:
        """Whether this process may act as leader now (any thread may ask)."""
        return self._leader and self._mono() < self._trusted_until

    def fence(self) -> tuple[str, int] | None:
        """(holder, term) for the writes' check while leading, else None."""
        return (self.holder, self._term) if self.is_leader() else None

    def step_down(self) -> None:
        """A fenced write was refused: stop trusting the term (try again later)."""
        self._set_leader(False)

    def _set_leader(self, value: bool) -> None:
        if value != self._leader:
            self._leader = value
            log.info("leadership " + ("acquired" if value else "lost"), term=self._term)
            self._on_leadership(value)

    async def _acquire_or_renew(self, conn: asyncpg.Connection) -> None:
        started = self._mono()
        fresh = False
        if not self._locked:
            # Held by every leader on this session: whoever gets it knows the
            # last leader's session is gone (killed, not merely slow).
            self._locked = fresh = bool(await conn.fetchval(control_sql.LEADER_LOCK, timeout=5))
        if self._leader and started < self._trusted_until:
            term = await conn.fetchval(
                control_sql.LEADER_RENEW,
                self.holder,
                self._term,
                self._ttl,
                self._locked,
                timeout=5,
            )
        else:
            self._set_leader(False)
            # Only a lock just taken proves the last leader's session gone: one
            # kept from our own earlier term (we were frozen or cut off while
            # another took the expired term) gives no right to take it back.
            term = await conn.fetchval(
                control_sql.LEADER_ACQUIRE, self.holder, self._ttl, fresh, self._locked, timeout=5
            )
            if term is None and self._locked and not fresh:
                # Another leads now: let it hold the lock, so that its death is
                # noticed at once again.
                await conn.fetchval(control_sql.LEADER_UNLOCK, timeout=5)
                self._locked = False
        if term is None:
            self._set_leader(False)
            return
        self._term = int(term)
        self._trusted_until = started + self._ttl - self._margin
        self._set_leader(True)

    async def notify_wake(self, why: str) -> None:
        """NOTIFY the leader's reconciler (wherever it runs): there is news."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return  # the leader's periodic pass finds it
        try:
            await conn.execute(control_sql.WAKE, why, timeout=2)
        except (*UNAVAILABLE_ERRORS,) as err:
            log.debug("wake-up not sent", error=f"{type(err).__name__}: {err}")

    async def release(self) -> None:
        """End our term now (after the background work stopped)."""
        conn, term = self._conn, self._term
        was = self._leader
        self._leader = False
        self._trusted_until = 0.0
        if not was or conn is None or conn.is_closed():
            return
        try:
            await conn.execute(control_sql.LEADER_RELEASE, self.holder, term, timeout=2)
            log.info("leadership released", term=term)
        except (*UNAVAILABLE_ERRORS,) as err:  # it expires by itself after the ttl
            log.warning("leadership not released", error=f"{type(err).__name__}: {err}")

    def _wake(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._on_wake()

    def _assigned(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._on_assigned(payload)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a session until ``stop``. No error ends this loop: a lost or
        read-only session (a failover), a failed LISTEN, even an unexpected
        error is logged and the session made anew, with backoff."""
        retry = Retry(RECONNECT_FIRST, RECONNECT_CAP, jitter=False)
        while not stop.is_set():
            self._established = False
            try:
                await self._session(stop)
            except Exception as err:
                self._lost(err)
            finally:
                self._set_leader(False)
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
            if stop.is_set():
                break
            if self._established:
                retry.reset()  # it worked until now: try again soon
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry.next_delay())

    def _lost(self, err: Exception) -> None:
        error = f"{type(err).__name__}: {echo(str(err), 200)}"
        ro = read_only(err)
        if ro:
            log.warning("control session is read-only (a standby?); reconnecting", error=error)
        elif isinstance(err, RETRYABLE_ERRORS):  # connection lost, server gone
            log.warning("control connection lost", error=error)
        else:
            log.exception("control connection failed")
        if self._established or ro:
            self._on_dropped(ro)

    async def _session(self, stop: asyncio.Event) -> None:
        conn = await open_connection(self._url, self._settings, application_name="vmpool-control")
        self._conn = conn
        self._locked = False
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _c: closed.set())
        if self._on_connected is not None:
            await self._on_connected(conn)
        # A standby refuses LISTEN (25006): run() reconnects, maybe to the new primary.
        await conn.add_listener("vmpool_wake", self._wake)
        await conn.add_listener("vmpool_assigned", self._assigned)
        self._established = True
        self._on_wake()  # we may have missed notifications while disconnected
        while not stop.is_set() and not closed.is_set():
            if self._lead:
                await self._acquire_or_renew(conn)
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(closed.wait())]
            try:
                await asyncio.wait(waiters, timeout=self._interval, return_when="FIRST_COMPLETED")
            finally:
                for w in waiters:
                    w.cancel()
        if stop.is_set():
            await self.release()
        if closed.is_set() and not stop.is_set():
            raise asyncpg.exceptions.ConnectionDoesNotExistError("control connection closed")

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            try:
                await asyncio.wait_for(self._conn.close(), 2)
            except (*UNAVAILABLE_ERRORS,):
                self._conn.terminate()
        self._conn = None
