"""Reading lease events (migration 0060 writes them, from triggers): the fan-out
reader's next batch, a stream's catch-up pages, the snapshot, and pruning."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from vmpool.core.instant import Instant
from vmpool.domain.watch import Cursor, Event, Snapshot
from vmpool.store.db import Database
from vmpool.store.errors import translated
from vmpool.store.records import expiry_of, record_of

_COLUMNS = """
    pos::text::bigint AS pos, seq, txid::text::bigint AS txid, at, kind, instance, pool,
    service_tag, principal, cause, reservation_id, expires_at, expires_round_ns, reason
"""

# The reader's next batch: events after $1/$2 whose transactions, and every
# one that could still write before them, have finished (pos below the
# snapshot's xmin); whether later ones are already committed (pending: look
# again soon, the transaction holding them back may never NOTIFY); the xmin.
# Both read the primary key's ends, never the whole table: "pending" is the
# greatest pos (an EXISTS here was planned as a sequential scan, run once per
# row returned), and the order is the columns' (a bare "pos" would be the
# output's bigint alias: every row after the cursor read and sorted).
FETCH_NEW = f"""
WITH s AS MATERIALIZED (
    SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x,
           pg_snapshot_xmax(pg_current_snapshot()) AS y
), p AS MATERIALIZED (
    SELECT coalesce((SELECT max(pos) FROM lease_events) >= s.x, false) AS pending FROM s
)
SELECT s.x::text::bigint AS xmin, s.y::text::bigint AS xmax, p.pending, e.*
FROM s CROSS JOIN p LEFT JOIN LATERAL (
    SELECT {_COLUMNS} FROM lease_events
    WHERE (pos, seq) > ($1::bigint::text::xid8, $2::bigint) AND pos < s.x
    ORDER BY lease_events.pos, lease_events.seq
    LIMIT $3
) e ON true
"""

# A stream's catch-up: events after $1/$2 up to the reader's tail $3/$4
# (final), with the retention horizon read in the same snapshot.
PAGE = f"""
SELECT h.pos::text::bigint AS hpos, h.seq AS hseq, e.*
FROM lease_events_horizon h LEFT JOIN LATERAL (
    SELECT {_COLUMNS} FROM lease_events
    WHERE (pos, seq) > ($1::bigint::text::xid8, $2::bigint)
      AND (pos, seq) <= ($3::bigint::text::xid8, $4::bigint)
    ORDER BY lease_events.pos, lease_events.seq  -- the columns (as FETCH_NEW)
    LIMIT $5
) e ON true
"""

HORIZON = "SELECT pos::text::bigint AS pos, seq FROM lease_events_horizon"

XMAX = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"

SNAPSHOT_POINT = """
SELECT pg_snapshot_xmin(s)::text::bigint AS xmin, pg_snapshot_xmax(s)::text::bigint AS xmax,
       ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(s) x) AS xip
FROM (SELECT pg_current_snapshot() AS s) q
"""

SNAPSHOT_LEASES = """
SELECT instance, pool, service_tag, principal, reservation_id, leased_at, expires_at,
       expires_round_ns
FROM leases ORDER BY pool, leased_at, instance
"""

SNAPSHOT_RESERVATIONS = """
SELECT id, pool, service_tag, principal, enqueued_at, expires_at, instance
FROM reservations WHERE NOT served ORDER BY pool, seq
"""

# One batch of events recorded more than $1 seconds ago (database clock, as
# `at`), oldest first; the horizon moves to the last one deleted, so a cursor
# before it is refused (OUT_OF_RANGE).
PRUNE = """
WITH old AS MATERIALIZED (
    SELECT pos, seq FROM lease_events WHERE at < clock_timestamp() - make_interval(secs => $1)
    ORDER BY pos, seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM lease_events e USING old WHERE e.pos = old.pos AND e.seq = old.seq
    RETURNING e.pos, e.seq
), top AS (
    SELECT pos, seq FROM gone ORDER BY pos DESC, seq DESC LIMIT 1
), moved AS (
    UPDATE lease_events_horizon h SET pos = top.pos, seq = top.seq
    FROM top WHERE (top.pos, top.seq) > (h.pos, h.seq)
)
SELECT count(*) FROM gone
"""


async def snapshot(conn: asyncpg.Connection) -> SnapshotView:
    """``snapshot`` on a connection of one's own (the reader's)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        point = await conn.fetchrow(SNAPSHOT_POINT)
        leases = await conn.fetch(SNAPSHOT_LEASES)
        queued = await conn.fetch(SNAPSHOT_RESERVATIONS)
    assert point is not None
    snap = Snapshot(int(point["xmin"]), int(point["xmax"]), frozenset(point["xip"]))
    return SnapshotView(
        snap,
        [
            Event(
                0,
                0,
                0,
                r["leased_at"],
                "lease",
                r["instance"],
                r["pool"],
                r["service_tag"],
                r["principal"],
                r["principal"],
                r["reservation_id"],
                expiry_of(r),
            )
            for r in leases
        ],
        [
            Event(
                0,
                0,
                0,
                r["enqueued_at"],
                "reservation",
                r["instance"] or "",
                r["pool"],
                r["service_tag"],
                r["principal"],
                r["principal"],
                r["id"],
                Instant.from_datetime(r["expires_at"]),
            )
            for r in queued
        ],
    )


def event_of(row: Any) -> Event:
    expires = expiry_of(row) if row["expires_at"] is not None else None
    return record_of(Event, row, expires=expires)


@dataclass(frozen=True, slots=True)
class Batch:
    events: list[Event]
    xmin: int
    xmax: int
    pending: bool  # committed events wait behind an older transaction still running


@dataclass(frozen=True, slots=True)
class Page:
    events: list[Event]
    horizon: Cursor
    upto: Cursor  # the bound it was read to


@dataclass(frozen=True, slots=True)
class SnapshotView:
    snapshot: Snapshot
    leases: list[Event]  # kind "lease": the current leases
    reservations: list[Event]  # kind "reservation": the queued reservations


async def fetch_new(conn: asyncpg.Connection, after: Cursor, limit: int) -> Batch:
    """On the reader's own connection (it also LISTENs)."""
    rows = await conn.fetch(FETCH_NEW, after.pos, after.seq, limit, timeout=10)
    first = rows[0]
    events = [event_of(r) for r in rows if r["pos"] is not None]
    return Batch(events, int(first["xmin"]), int(first["xmax"]), bool(first["pending"]))


class EventStore:
    def __init__(self, pool: Database) -> None:
        self._pool = pool

    async def page(self, after: Cursor, upto: Cursor, limit: int) -> Page:
        async with translated():
            rows = await self._pool.fetch(PAGE, after.pos, after.seq, upto.pos, upto.seq, limit)
        first = rows[0]
        return Page(
            [event_of(r) for r in rows if r["pos"] is not None],
            Cursor(int(first["hpos"]), int(first["hseq"])),
            upto,
        )

    async def horizon(self) -> Cursor:
        async with translated():
            row = await self._pool.fetchrow(HORIZON)
        assert row is not None  # one row, from the migration
        return Cursor(int(row["pos"]), int(row["seq"]))

    async def xmax(self) -> int:
        """The next transaction id now: no position is beyond it yet."""
        async with translated():
            return int(await self._pool.fetchval(XMAX))

    async def snapshot(self) -> SnapshotView:
        """Current leases and queued reservations, and the snapshot they were read in."""
        async with translated(), self._pool.acquire() as conn:
            return await snapshot(conn)

    async def prune(self, older_than: timedelta, batch: int) -> int:
        """Delete one batch of events older than ``older_than``; how many."""
        return await prune(self._pool, older_than, batch)


async def prune(db: Database, older_than: timedelta, batch: int) -> int:
    async with translated():
        n = await db.fetchval(PRUNE, older_than.total_seconds(), batch)
    return int(n)
