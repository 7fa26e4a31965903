"""What recording lease events costs the Lease/Return path (migration 0061):
no NOTIFY from Lease, Extend or Return, and no wait for a later writer."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

from tests.integration.test_store import HOUR_ON, NOW, seed
from vmpool.domain.watch import Cursor
from vmpool.store.db import Database
from vmpool.store.events import FETCH_NEW, PAGE, fetch_new
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore


async def test_lease_extend_return_send_no_notify_the_reconciler_and_operators_do(
    db: Database,
) -> None:
    store = LeaseStore(db)
    await seed(db, "p", 5)  # a returned instance is not leased again
    got: list[Any] = []
    arrived = asyncio.Event()

    def heard(*args: Any) -> None:
        got.append(args)
        arrived.set()

    async with db.acquire() as listener:
        await listener.add_listener("vmpool_events", heard)
        try:
            for _ in range(3):
                lease = await store.claim_free("p", "ci", NOW, HOUR_ON)
                assert lease is not None
                await store.extend(lease.instance, "ci", lambda _l: HOUR_ON + timedelta(minutes=5))
                await store.return_lease(lease.instance, "ci", NOW)
            # A stop NOTIFYs; notifications arrive in commit order, so any from
            # the Leases, Extends and Returns above would have come first.
            stopped = await store.claim_free("p", "ci", NOW, HOUR_ON)
            assert stopped is not None
            await store.force_return(stopped.instance, NOW, "StopLease", by="root")
            await asyncio.wait_for(arrived.wait(), 30)
            assert len(got) == 1
            arrived.clear()
            expiring = await store.claim_free("p", "ci", NOW, HOUR_ON)
            assert expiring is not None
            await Inventory(db).expire_leases(NOW + timedelta(hours=2))
            await asyncio.wait_for(arrived.wait(), 30)
            assert len(got) == 2
        finally:
            await listener.remove_listener("vmpool_events", heard)
    kinds = [r["kind"] for r in await db.fetch("SELECT kind FROM lease_events ORDER BY pos, seq")]
    assert kinds == [
        *["leased", "extended", "returned"] * 3,
        "leased",
        "stopped",
        "leased",
        "expired",
    ]


async def test_an_event_is_served_once_its_own_transaction_ends(db: Database) -> None:
    """A writer whose xid is older than another's that committed first: its
    event is served as soon as it commits (0060 positioned it at the next xid
    nobody had taken yet, so it waited for a later writer to come and finish)."""
    (a,) = await seed(db, "p", 1)
    async with db.acquire() as writer, db.acquire() as other, db.acquire() as reader:
        tx = writer.transaction()
        await tx.start()
        await writer.execute("SELECT pg_current_xact_id()")  # its xid: X
        await other.execute("SELECT pg_current_xact_id()")  # X + 1, committed at once
        await writer.execute(
            """INSERT INTO leases (instance, pool, service_tag, leased_at, expires_at)
               VALUES ($1, 'p', 't', now(), now() + interval '1 hour')""",
            a,
        )
        await tx.commit()
        batch = await fetch_new(reader, Cursor(0, 0), 100)
    assert [(e.kind, e.instance) for e in batch.events] == [("leased", a)]
    assert not batch.pending


async def test_a_committed_event_behind_an_open_transaction_is_pending_then_served(
    db: Database,
) -> None:
    """An event committed after an older transaction (with an xid) began is
    held back while that one runs, and the reader is told it is pending (so
    it looks again soon); once the older one ends, it is served, once."""
    (a,) = await seed(db, "p", 1)
    async with db.acquire() as older, db.acquire() as reader:
        tx = older.transaction()
        await tx.start()
        await older.execute("SELECT pg_current_xact_id()")  # an xid below the writer's
        lease = await LeaseStore(db).claim_free("p", "ci", NOW, HOUR_ON)
        assert lease is not None and lease.instance == a
        held = await fetch_new(reader, Cursor(0, 0), 100)
        assert held.events == [] and held.pending
        await tx.rollback()
        served = await fetch_new(reader, Cursor(0, 0), 100)
        assert [(e.kind, e.instance) for e in served.events] == [("leased", a)]
        assert not served.pending
        last = served.events[-1]
        after = await fetch_new(reader, Cursor(last.pos, last.seq), 100)
        assert after.events == [] and not after.pending


def _blocks(plan: Any) -> int:
    """Buffers a statement touched (EXPLAIN ANALYZE, BUFFERS: the top node's
    counts include its children's, subplans too)."""
    top = plan[0]["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


async def test_the_readers_queries_read_the_index_ends_not_the_whole_table(
    db: Database,
) -> None:
    """The reader's look at the tail and a catch-up page touch a few index and
    heap pages however many events are kept (an hour of them by default): the
    look used to scan every event once per fetch, and a page to sort every
    event after its cursor."""
    await db.execute(
        """INSERT INTO lease_events (pos, kind, instance, pool, service_tag, principal, cause)
           SELECT (g / 40)::text::xid8, 'leased', 'i' || g, 'p', 't', 'a', 'a'
           FROM generate_series(1, 20000) g"""
    )
    await db.execute("ANALYZE lease_events")
    top = await db.fetchrow(
        "SELECT pos::text::bigint AS pos, seq FROM lease_events ORDER BY pos DESC, seq DESC LIMIT 1"
    )
    assert top is not None
    table = await db.fetchval(
        "SELECT pg_relation_size('lease_events') / current_setting('block_size')::int"
    )
    assert table > 100  # so that a whole-table read would show
    at_tail = await db.fetchval(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + FETCH_NEW, top["pos"], top["seq"], 1000
    )
    assert _blocks(json.loads(at_tail)) < 30
    first_page = await db.fetchval(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + PAGE, 0, 0, top["pos"], top["seq"], 10
    )
    assert _blocks(json.loads(first_page)) < 30
