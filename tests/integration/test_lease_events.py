"""Lease events on a real PostgreSQL (migration 0060): recorded in the
transaction of each change, in order, once; read back by cursor."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from tests.integration.test_store import HOUR_ON, NOW, seed
from vmpool.core.instant import Instant
from vmpool.domain.watch import Cursor, Event, Scope
from vmpool.services.lease_events import EventHub, Subscription, WatchLimits
from vmpool.store.db import Database, create_pool
from vmpool.store.events import EventStore
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore, NotLeased, WrongTag
from vmpool.store.records import Owner


async def kinds(db: Database) -> list[tuple[str, str, str]]:
    rows = await db.fetch("SELECT kind, instance, cause FROM lease_events ORDER BY pos, seq")
    return [(r["kind"], r["instance"], r["cause"]) for r in rows]


async def test_each_change_records_its_event_with_its_cause(db: Database) -> None:
    store = LeaseStore(db)
    inv = Inventory(db)
    a, b, c, d = await seed(db, "p", 4)
    got = await store.claim_free("p", "ci", NOW, HOUR_ON, Owner("alice", "ci", "alice"))
    assert got is not None and got.instance == a
    await store.extend(a, "ci", lambda _l: HOUR_ON + timedelta(minutes=5), principal="alice")
    await store.return_lease(a, "ci", NOW, principal="alice")
    lease2 = await store.claim_free("p", "ci", NOW, HOUR_ON)
    assert lease2 is not None
    await store.force_return(lease2.instance, NOW, "StopLease", by="root")
    lease3 = await store.claim_free("p", "", NOW, Instant.from_datetime(NOW))
    assert lease3 is not None
    await inv.expire_leases(NOW + timedelta(seconds=1))
    assert await kinds(db) == [
        ("leased", a, "alice"),
        ("extended", a, "alice"),
        ("returned", a, "alice"),
        ("leased", b, "anonymous"),
        ("stopped", b, "root"),
        ("leased", c, "anonymous"),
        ("expired", c, "vmpool:reconciler"),
    ]
    # The queue: queued, served; queued, cancelled; queued, expired.
    r1, r2, r3 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await db.execute("DELETE FROM lease_events")
    await db.execute("UPDATE instances SET state = 'destroying' WHERE name = $1", d)
    for r in (r1, r2, r3):
        first = await store.claim_or_enqueue(
            "p", "ci", r, NOW, HOUR_ON, NOW + timedelta(seconds=30)
        )
        assert first is not None and first.lease is None
    await store.cancel_reservation(r2, "ci", "anonymous", NOW)
    await seed(db, "p", 1, start=100)
    assert await inv.set_aside("p", NOW, 5)
    served = await store.serve_reserved(r1, NOW, HOUR_ON)
    assert served is not None
    await inv.expire_reservations(NOW + timedelta(minutes=1))
    rows = await db.fetch(
        "SELECT kind, reservation_id, cause, reason FROM lease_events ORDER BY pos, seq"
    )
    assert [(r["kind"], r["reservation_id"], r["cause"]) for r in rows] == [
        ("reservation_queued", r1, "anonymous"),
        ("reservation_queued", r2, "anonymous"),
        ("reservation_queued", r3, "anonymous"),
        ("reservation_cancelled", r2, "anonymous"),
        ("reservation_served", r1, "anonymous"),
        ("leased", r1, "anonymous"),
        ("reservation_expired", r3, "vmpool:reconciler"),
    ]


async def test_a_change_rolled_back_leaves_no_event(db: Database) -> None:
    (a,) = await seed(db, "p", 1)
    async with db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            """INSERT INTO leases (instance, pool, service_tag, leased_at, expires_at)
               VALUES ($1, 'p', 't', now(), now() + interval '1 hour')""",
            a,
        )
        assert await conn.fetchval("SELECT count(*) FROM lease_events") == 1
        await tx.rollback()
    assert await kinds(db) == []


def hub_for(db_url: str, db: Database, **limits: Any) -> EventHub:
    return EventHub(db_url, EventStore(db), WatchLimits(**limits), encode=lambda _e: b"")


async def collect(sub: Subscription, until: Callable[[list[Event]], bool]) -> list[Event]:
    got: list[Event] = []
    while not until(got):
        if await sub.idle(20):  # no news for 20 s
            raise AssertionError(f"stalled after {len(got)} events")
        while sub.queue:
            e, _, expiring = sub.queue.popleft()
            if not expiring:
                got.append(e)
        assert sub.ended is None, sub.ended
    return got


async def test_two_replicas_leasing_returning_and_expiring_give_every_event_once_in_order(
    db_url: str, db: Database
) -> None:
    """Two stores (two replicas' pools) lease, return and expire at once; the
    reader hands out each committed event once, in (pos, seq) order, and each
    lease's events in the order they happened."""
    other = await create_pool(db_url, min_size=1, max_size=20)
    hub = hub_for(db_url, db, buffer=100_000)
    try:
        await seed(db, "p", 400)
        sub = await hub.open(Scope(), None, "peer")
        assert hub.go_live(sub)

        async def churn(store: LeaseStore, tag: str, n: int) -> None:
            for i in range(n):
                got = await store.claim_free(
                    "p", tag, NOW, Instant.from_datetime(NOW + timedelta(seconds=i % 3))
                )
                if got is not None and i % 2 == 0:
                    with contextlib.suppress(NotLeased, WrongTag):
                        await store.return_lease(got.instance, tag, NOW)

        async def expire() -> None:
            for i in range(40):
                await Inventory(other).expire_leases(NOW + timedelta(seconds=i % 4))
                await asyncio.sleep(0)

        stores = [LeaseStore(db), LeaseStore(other)]
        await asyncio.gather(*(churn(stores[k % 2], f"t{k}", 40) for k in range(8)), expire())
        total = await db.fetchval("SELECT count(*) FROM lease_events")
        got = await collect(sub, lambda ev: len(ev) >= total)
        await asyncio.sleep(0.2)
        while sub.queue:
            got.append(sub.queue.popleft()[0])
        keys = [(e.pos, e.seq) for e in got]
        assert len(keys) == total == len(set(keys))
        assert keys == sorted(keys)
        rows = await db.fetch("SELECT pos::text::bigint AS pos, seq FROM lease_events")
        assert set(keys) == {(r["pos"], r["seq"]) for r in rows}
        by_instance: dict[str, list[str]] = {}
        for e in got:
            by_instance.setdefault(e.instance, []).append(e.kind)
        for instance, seq in by_instance.items():
            assert seq[0] == "leased" and len(seq) <= 2, (instance, seq)
    finally:
        await hub.shutdown()
        await other.close()


async def test_a_cursor_before_the_pruned_horizon_is_out_of_range_and_after_it_resumes(
    db: Database,
) -> None:
    store = LeaseStore(db)
    names = await seed(db, "p", 3)
    for _ in names:
        got = await store.claim_free("p", "t", NOW, HOUR_ON)
        assert got is not None
        await store.return_lease(got.instance, "t", NOW)
    events = EventStore(db)
    tail = Cursor(2**62, 0)
    page = await events.page(Cursor(0, 0), tail, 100)
    assert [e.kind for e in page.events] == ["leased", "returned"] * 3
    second = page.events[1]
    # Everything recorded so far is older than "1 s from now": prune two.
    assert await events.prune(timedelta(seconds=-1), 2) == 2
    again = await events.page(Cursor(0, 0), tail, 100)
    assert again.horizon == Cursor(second.pos, second.seq)
    assert Cursor(0, 0) < again.horizon  # the server answers OUT_OF_RANGE here
    resumed = await events.page(again.horizon, tail, 100)
    assert [(e.pos, e.seq) for e in resumed.events] == [(e.pos, e.seq) for e in page.events[2:]]


async def test_each_stream_gets_exactly_the_events_its_scope_sees_once_in_order(
    db_url: str, db: Database
) -> None:
    """The fan-out looks an event up by its owner (principal, tag; a stream's
    filter on either may be "any"): each stream gets every event its scope
    sees, once, in order, and nothing else, whatever the mix of scopes."""
    hub = hub_for(db_url, db, buffer=10_000)
    store = LeaseStore(db)
    try:
        await seed(db, "p", 8)
        await seed(db, "q", 4)
        scopes = [
            Scope(),
            Scope(service_tag="a"),
            Scope(principal="alice"),
            Scope("alice", "a"),
            Scope("bob", "b"),
            Scope(None, "b", pool="q"),
            Scope(None, "a", instance="nothing-here"),
            Scope(principal="carol"),
        ]
        subs = [await hub.open(s, None, f"peer-{i}") for i, s in enumerate(scopes)]
        assert all(hub.go_live(sub) for sub in subs)
        for pool in ("p", "q"):
            for who, tag in (("alice", "a"), ("alice", "b"), ("bob", "a"), ("bob", "b")):
                got = await store.claim_free(pool, tag, NOW, HOUR_ON, Owner(who, tag, who))
                assert got is not None
                await store.return_lease(got.instance, tag, NOW, principal=who)
        total = await db.fetchval("SELECT count(*) FROM lease_events")
        assert total == 16
        everything = await collect(subs[0], lambda ev: len(ev) >= total)
        # Offers are synchronous: once the all-seeing stream has an event, every
        # stream that may see it has it queued too.
        for scope, sub in zip(scopes[1:], subs[1:], strict=True):
            queued = [e for e, _, _ in sub.queue]
            assert queued == [e for e in everything if scope.sees(e)], scope
        assert [len(sub.queue) for sub in subs[1:]] == [8, 8, 4, 4, 4, 0, 0]
    finally:
        await hub.shutdown()
