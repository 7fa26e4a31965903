"""What recording lease events costs the Lease/Return path (migration 0061):
no NOTIFY from Lease, Extend or Return, and no wait for a later writer."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from tests.integration.test_store import HOUR_ON, NOW, seed
from vmpool.domain.watch import Cursor
from vmpool.store.db import Database
from vmpool.store.events import fetch_new
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
