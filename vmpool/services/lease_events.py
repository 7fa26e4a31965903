"""The fan-out of lease events in one process: one reader with one database
connection, however many streams. It fetches what is new when woken (this
process's Lease/Extend/Return: poke; any other change: NOTIFY vmpool_events)
or every LIVE_POLL_S while streams are open (another replica's Lease/Return
sends no NOTIFY). Each event is fetched once and handed to the streams that
may see it, in memory; each stream has a bounded buffer.

Derived "expiring" events are not stored: the reader keeps the active leases
(loaded at start, then kept by the events), and per lead time a heap of when
each lease becomes "expiring"; a stream joining late gets those already due at
once. Each (lease, expiry) is announced once per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from vmpool.core.backoff import Retry
from vmpool.core.wakeup import Wakeup
from vmpool.domain.watch import Cursor, Event, Scope
from vmpool.services.watch_subscription import StreamEnded, Subscription, WatchLimits
from vmpool.store.connect import ConnectSettings, open_connection
from vmpool.store.errors import UNAVAILABLE_ERRORS
from vmpool.store.events import EventStore, fetch_new, snapshot

__all__ = ["EventHub", "StreamEnded", "Subscription", "WatchLimits"]

log = structlog.get_logger("vmpool.events")

FETCH_LIMIT = 1000
RECENT = 20_000  # events kept in memory for streams joining behind the tail
# With no stream open, the reader looks this often (the tail and the leases
# stay current; nobody would get the events of a fetch per change).
POLL_S = 1.0
# With streams open: Lease, Extend and Return do not NOTIFY (migration 0061);
# the process that made such a change wakes its reader at once (poke), and
# this is how late another process's change (another replica's) can be seen.
LIVE_POLL_S = 0.05
# At least this long from one fetch to the next: under load, the wake-ups of
# many commits are served by one fetch, not one fetch each.
MIN_GAP_S = 0.005
# Committed events wait behind an older transaction still running: look again
# after this, doubling up to PENDING_MAX_S (that transaction may never NOTIFY:
# the reconciler's, or any without events). Only while streams are open.
PENDING_MIN_S = 0.002
PENDING_MAX_S = 0.02


def owner_keys(principal: str, service_tag: str) -> tuple[tuple[str | None, str | None], ...]:
    """The fan-out keys of the streams that may see an event of this owner:
    a stream's key is its scope's (principal, service_tag), None for any."""
    return (None, None), (None, service_tag), (principal, None), (principal, service_tag)


class _Expiring:
    """Leases by when they become "expiring" for one lead time."""

    def __init__(self, lead_ns: int) -> None:
        self.lead_ns = lead_ns
        self.heap: list[tuple[int, str, int]] = []  # (due ns, instance, expires ns)
        self.subs: set[Subscription] = set()
        self.timer: asyncio.TimerHandle | None = None


class EventHub:
    def __init__(
        self,
        url: str,
        store: EventStore,
        limits: WatchLimits,
        *,
        encode: Callable[[Event], bytes],
        on_streams: Callable[[int], None] = lambda _n: None,
        wall_ns: Callable[[], int] = time.time_ns,
        settings: ConnectSettings | None = None,
    ) -> None:
        self._url = url
        self._settings = settings if settings is not None else ConnectSettings()
        self._store = store
        self.limits = limits
        self._on_streams = on_streams
        self._encode = encode
        self._wall_ns = wall_ns
        self.tail = Cursor(0, 0)
        self.xmax = 0
        self._leases: dict[str, Event] = {}
        # The latest events, for streams joining a little behind the tail
        # (after a snapshot or a catch-up page): complete after _recent_from.
        self._recent: deque[Event] = deque(maxlen=RECENT)
        self._recent_from = Cursor(0, 0)
        self._subs: set[Subscription] = set()
        # Live streams by (principal, service_tag) of their scope, None for any:
        # an event is looked at only by the streams of its owner's four keys
        # (100 streams watching their own tags cost nothing for others' events).
        self._by_owner: dict[tuple[str | None, str | None], set[Subscription]] = {}
        self._per_peer: dict[Any, int] = {}
        self._groups: dict[int, _Expiring] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._news = False  # a NOTIFY or a poke came since the last fetch began
        self._wanted = False  # a first stream wants a fresh tail
        self._idle_reader: Wakeup[None] = Wakeup()
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._closing = False
        self._none_left = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self.tail_changed = asyncio.Event()  # set on every batch (tests wait on it)
        self._batch = 0  # fetches handed out (Subscription.push judges by them)

    # --- streams ---------------------------------------------------------------

    async def open(self, scope: Scope, lead_s: int | None, peer: Any) -> Subscription:
        """A new stream (not live yet); StreamEnded over a cap or while closing."""
        await self._ensure_started()
        if not self._subs:
            await self._fresh_tail()
        # No await from the checks to the count: concurrent opens see each other.
        if self._closing:
            raise StreamEnded("UNAVAILABLE", "server is shutting down, retry")
        if len(self._subs) >= self.limits.max_streams:
            raise StreamEnded(
                "RESOURCE_EXHAUSTED",
                f"watch: {len(self._subs)} streams open on this server, the limit "
                "(limits.max_watch_streams)",
            )
        if self._per_peer.get(peer, 0) >= self.limits.max_streams_per_connection:
            raise StreamEnded(
                "RESOURCE_EXHAUSTED",
                f"watch: {self.limits.max_streams_per_connection} streams open on this "
                "connection, the limit (limits.max_watch_streams_per_connection)",
            )
        sub = Subscription(scope, lead_s, peer, self.tail)
        self._subs.add(sub)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._on_streams(len(self._subs))
        return sub

    async def _fresh_tail(self) -> None:
        """With no stream open the reader looks only once a second (NOTIFYs are
        not followed: nobody would get the events); a first stream waits for one
        look now, so that "from now" is now."""
        changed = self.tail_changed
        self._wanted = True
        self._rouse(force=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), 5)

    def go_live(self, sub: Subscription) -> bool:
        """Join the fan-out if ``sub`` has caught up with the reader, or is
        behind it by no more than the recent events kept in memory (replayed
        to it first). No await between the check and the join, so no event
        falls in between; False: read more from the database first."""
        if sub.ended is not None:
            return True
        if sub.position < self.tail:
            if sub.position < self._recent_from:
                return False
            after = sub.position.pos, sub.position.seq
            gap: list[Event] = []
            for e in reversed(self._recent):
                if (e.pos, e.seq) <= after:
                    break
                if sub.scope.sees(e):
                    gap.append(e)
                    if len(gap) > self.limits.buffer // 2:
                        return False  # a long way behind: pages from the database
            self._batch += 1
            for e in reversed(gap):
                self._deliver(sub, e, None, self._batch)
        sub.live = True
        sub.floor = max(sub.position, self.tail)
        key = sub.scope.principal, sub.scope.service_tag
        self._by_owner.setdefault(key, set()).add(sub)
        if sub.lead_ns is not None:
            self._join_expiring(sub)
        return True

    def close(self, sub: Subscription) -> None:
        if sub not in self._subs:
            return
        self._subs.discard(sub)
        key = sub.scope.principal, sub.scope.service_tag
        owners = self._by_owner.get(key)
        if owners is not None:
            owners.discard(sub)
            if not owners:
                del self._by_owner[key]
        n = self._per_peer.get(sub.peer, 0) - 1
        if n > 0:
            self._per_peer[sub.peer] = n
        else:
            self._per_peer.pop(sub.peer, None)
        if sub.lead_ns is not None:
            group = self._groups.get(sub.lead_ns)
            if group is not None:
                group.subs.discard(sub)
                if not group.subs:
                    if group.timer is not None:
                        group.timer.cancel()
                    del self._groups[sub.lead_ns]
        self._on_streams(len(self._subs))
        if not self._subs:
            self._none_left.set()

    @property
    def streams(self) -> int:
        return len(self._subs)

    @property
    def closing(self) -> bool:
        return self._closing

    async def shutdown(self, timeout: float = 5.0) -> None:
        """End every stream with UNAVAILABLE and its resume cursor; stop the reader."""
        self._closing = True
        for sub in list(self._subs):
            sub.end(StreamEnded("UNAVAILABLE", f"server is shutting down; {sub.resume_hint()}"))
        if self._subs:
            self._none_left.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_left.wait(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *UNAVAILABLE_ERRORS):
                await self._task
        for group in self._groups.values():
            if group.timer is not None:
                group.timer.cancel()

    # --- the reader -------------------------------------------------------------

    def poke(self) -> None:
        """This process changed leases or reservations: look for new events now
        (from any thread; the Lease/Return path's changes send no NOTIFY)."""
        loop = self._loop
        if loop is None or self._news:
            return
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            self._news = True
            self._rouse()
        else:
            loop.call_soon_threadsafe(self._notified)

    def _rouse(self, *, force: bool = False) -> None:
        """Wake the idle reader: for news only while streams are open."""
        if force or self._subs:
            self._idle_reader.wake(None)

    async def _idle(self, timeout: float) -> None:
        """Until news (streams open), a first stream, a lost connection, or ``timeout``."""
        if (self._news and self._subs) or self._wanted:
            return
        await self._idle_reader.wait(timeout, None)

    async def _ensure_started(self) -> None:
        if self._started is None:
            self._loop = asyncio.get_running_loop()
            self._started = asyncio.get_running_loop().create_future()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="vmpool-events")
        try:
            await asyncio.wait_for(asyncio.shield(self._started), 10)
        except TimeoutError:
            raise StreamEnded("UNAVAILABLE", "database unavailable, retry later") from None

    async def _load(self, conn: asyncpg.Connection) -> None:
        """The active leases and a tail to start from, in one snapshot. Events
        from that snapshot's xmin on are applied again; each sets a state, so
        the map ends right."""
        view = await snapshot(conn)
        self._leases = {e.instance: e for e in view.leases}
        self.tail = self._recent_from = Cursor(view.snapshot.xmin, 0)
        self.xmax = view.snapshot.xmax

    async def _run(self) -> None:
        retry = Retry(0.5, 10.0, jitter=False)
        assert self._started is not None
        while not self._closing:
            conn = None
            try:
                # As every session: host by host, keepalives, never a read-only server.
                conn = await open_connection(
                    self._url, self._settings, application_name="vmpool-events"
                )
                if not self._started.done():
                    await self._load(conn)  # its own connection: never queued behind calls
                self._conn = conn
                closed = asyncio.Event()
                conn.add_termination_listener(self._on_lost(closed))
                await conn.add_listener("vmpool_events", self._notified)
                if not self._started.done():
                    self._started.set_result(None)
                retry.reset()
                await self._follow(conn, closed)
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE_ERRORS as err:
                log.warning("event reader: database lost", error=f"{type(err).__name__}: {err}")
            except Exception:
                log.exception("event reader failed; restarting it")
            finally:
                self._conn = None
                if conn is not None:
                    conn.terminate()
            if self._closing:
                break
            await asyncio.sleep(retry.next_delay())

    def _on_lost(self, closed: asyncio.Event) -> Callable[[Any], None]:
        def lost(_conn: Any) -> None:
            closed.set()
            self._rouse(force=True)

        return lost

    def _notified(self, *_args: Any) -> None:
        self._news = True
        self._rouse()

    async def _follow(self, conn: asyncpg.Connection, closed: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        pending_wait = PENDING_MIN_S
        while not self._closing and not closed.is_set():
            self._news = self._wanted = False
            began = loop.time()
            batch = await fetch_new(conn, self.tail, FETCH_LIMIT)
            self.xmax = max(self.xmax, batch.xmax)
            if len(batch.events) == FETCH_LIMIT:
                last = batch.events[-1]
                self._offer(batch.events, Cursor(last.pos, last.seq))
                continue
            self._offer(batch.events, max(self.tail, Cursor(batch.xmin, 0)))
            if batch.events:
                pending_wait = PENDING_MIN_S  # moving: look again soon if need be
            if batch.pending and self._subs:
                timeout = pending_wait
                pending_wait = min(pending_wait * 2, PENDING_MAX_S)
            else:
                timeout = LIVE_POLL_S if self._subs else POLL_S
                pending_wait = PENDING_MIN_S
            await self._idle(timeout)
            gap = began + MIN_GAP_S - loop.time()
            if gap > 0 and not closed.is_set() and not self._wanted:
                await asyncio.sleep(gap)

    def _offer(self, events: list[Event], tail: Cursor) -> None:
        """Hand a batch to the streams that may see it, then move the tail."""
        self._batch += 1
        for e in events:
            self._apply(e)
            if len(self._recent) == self._recent.maxlen:
                first = self._recent[0]
                self._recent_from = Cursor(first.pos, first.seq)
            self._recent.append(e)
            encoded: bytes | None = None
            for sub in self._candidates(e):
                if (e.pos, e.seq) > (sub.floor.pos, sub.floor.seq):
                    encoded = self._deliver(sub, e, encoded, self._batch)
        self.tail = max(self.tail, tail)
        self._fire_all()
        self.tail_changed.set()
        self.tail_changed = asyncio.Event()

    def _deliver(
        self, sub: Subscription, e: Event, encoded: bytes | None, batch: int
    ) -> bytes | None:
        """Queue ``e`` (of fetch number ``batch``) for ``sub`` if it may see
        it; the shared encoding, made once."""
        if not sub.scope.sees(e) or sub.position.skips(e.pos, e.txid):
            return encoded
        if encoded is None and sub.position.snapshot is None:
            encoded = self._encode(e)  # once, whatever the number of streams
        sub.push((e, encoded, False), self.limits.buffer, batch)
        return encoded

    def _candidates(self, e: Event) -> list[Subscription]:
        """The live streams whose owner filters ``e`` passes (each once: a
        stream has one key); their pool and instance filters are still to check."""
        return [
            sub
            for key in owner_keys(e.principal, e.service_tag)
            for sub in self._by_owner.get(key, ())
        ]

    def _apply(self, e: Event) -> None:
        if e.kind in ("leased", "extended"):
            self._leases[e.instance] = e
            assert e.expires is not None
            for group in self._groups.values():
                heapq.heappush(group.heap, (e.expires.ns - group.lead_ns, e.instance, e.expires.ns))
        elif e.kind in ("expired", "returned", "stopped", "vanished", "released"):
            self._leases.pop(e.instance, None)

    # --- expiring ---------------------------------------------------------------

    def _join_expiring(self, sub: Subscription) -> None:
        assert sub.lead_ns is not None
        group = self._groups.get(sub.lead_ns)
        if group is None:
            group = self._groups[sub.lead_ns] = _Expiring(sub.lead_ns)
            for e in self._leases.values():
                assert e.expires is not None
                group.heap.append((e.expires.ns - group.lead_ns, e.instance, e.expires.ns))
            heapq.heapify(group.heap)
        self._fire(group)  # those due before it joined go to the others only
        group.subs.add(sub)
        now = self._wall_ns()
        for e in self._leases.values():
            assert e.expires is not None
            if e.expires.ns - group.lead_ns <= now and sub.scope.sees(e):
                sub.push((e, None, True), self.limits.buffer)
        self._schedule(group)

    def _fire_all(self) -> None:
        for group in list(self._groups.values()):
            self._fire(group)
            self._schedule(group)

    def _fire(self, group: _Expiring) -> None:
        now = self._wall_ns()
        heap = group.heap
        while heap and heap[0][0] <= now:
            _, instance, expires_ns = heapq.heappop(heap)
            lease = self._leases.get(instance)
            if lease is None or lease.expires is None or lease.expires.ns != expires_ns:
                continue  # ended or extended since
            for sub in group.subs:
                if sub.scope.sees(lease):
                    sub.push((lease, None, True), self.limits.buffer)

    def _schedule(self, group: _Expiring) -> None:
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        if group.heap:
            delay = max((group.heap[0][0] - self._wall_ns()) / 1e9, 0.0)
            group.timer = asyncio.get_running_loop().call_later(
                min(delay, 3600.0), self._on_timer, group
            )

    def _on_timer(self, group: _Expiring) -> None:
        group.timer = None
        if self._groups.get(group.lead_ns) is group:
            self._fire(group)
            self._schedule(group)
