"""The store on a real PostgreSQL: migrations, claims under contention, FIFO, plans."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.pg import TestPostgres
from vmpool.core.instant import Instant
from vmpool.store import inventory_sql, leases_sql
from vmpool.store.db import Database, create_pool, migrate, migrations
from vmpool.store.errors import Duplicate
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
HOUR_ON = Instant.from_datetime(NOW + timedelta(hours=1))


async def seed(db: Database, pool: str, ready: int, *, start: int = 0) -> list[str]:
    await db.execute("INSERT INTO pools (name) VALUES ($1) ON CONFLICT DO NOTHING", pool)
    names = [f"vmp-{pool}-{i:06d}" for i in range(start, start + ready)]
    await db.execute(
        """INSERT INTO instances (name, pool, state, created_at, ready_at, state_changed_at)
           SELECT n, $2, 'ready', $3::timestamptz, $3::timestamptz + (ord * interval '1 ms'), $3
           FROM unnest($1::text[]) WITH ORDINALITY AS u(n, ord)""",
        names,
        pool,
        NOW,
    )
    return names


async def test_migrations_apply_to_an_empty_database_once(postgres: TestPostgres) -> None:
    url = await postgres.empty()
    conns = [await asyncpg.connect(url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(name for r in results for name in r)
        assert applied == [name for _, name, _ in migrations()]
        assert await migrate(conns[0]) == []
        tables = {
            r["tablename"]
            for r in await conns[0].fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname='public'"
            )
        }
        assert {"pools", "instances", "leases", "reservations", "lease_history"} <= tables
    finally:
        for c in conns:
            await c.close()


async def test_leases_of_before_the_nanosecond_column_keep_their_expiry(
    postgres: TestPostgres,
) -> None:
    """0010 adds expires_round_ns: rows written before it were to the microsecond."""
    url = await postgres.empty()
    conn = await asyncpg.connect(url)
    try:
        for version, _, text in migrations():
            if version < 10:
                await conn.execute(text)
        await conn.execute(
            "CREATE TABLE schema_migrations (version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.executemany(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            [(v, name) for v, name, _ in migrations() if v < 10],
        )
        await conn.execute("INSERT INTO pools (name) VALUES ('p')")
        await conn.execute(
            "INSERT INTO instances (name, pool, state, created_at, state_changed_at)"
            " VALUES ('vmp-old', 'p', 'leased', $1, $1)",
            NOW,
        )
        expires = NOW + timedelta(hours=1, microseconds=7)
        await conn.execute(
            "INSERT INTO leases (instance, pool, service_tag, leased_at, expires_at)"
            " VALUES ('vmp-old', 'p', '', $1, $2)",
            NOW,
            expires,
        )
        assert "0010_expiry_nanoseconds.sql" in await migrate(conn)
    finally:
        await conn.close()
    db = await create_pool(url, min_size=1, max_size=2)
    try:
        lease = await LeaseStore(db).get_lease("vmp-old")
        assert lease is not None
        assert lease.expires_at == Instant.from_datetime(expires)
        assert lease.service_tag == ""
    finally:
        await db.close()


async def test_expiries_keep_their_nanoseconds_in_the_database(db: Database) -> None:
    await seed(db, "p", 2)
    store = LeaseStore(db)
    asked = Instant(HOUR_ON.ns + 123_456_789)
    lease = await store.claim_free("p", "", NOW, asked)
    assert lease is not None and lease.expires_at == asked
    row = await db.fetchrow(
        "SELECT expires_at, expires_round_ns FROM leases WHERE instance = $1", lease.instance
    )
    assert row is not None
    # Rounded up to the microsecond, so `expires_at <= now` is exact for a
    # microsecond clock; the nanoseconds below it are kept beside it.
    assert row["expires_at"] == NOW + timedelta(hours=1, microseconds=123_457)
    assert row["expires_round_ns"] == 211
    fetched = await store.get_lease(lease.instance)
    assert fetched is not None and fetched.expires_at == asked
    listed = await Inventory(db).list_leases("p")
    assert [r.expires_at for r in listed] == [asked]
    later = Instant(asked.ns + 3_600_000_000_001)
    extended = await store.extend(lease.instance, "", lambda _lease: later)
    assert extended.expires_at == later
    fetched = await store.get_lease(lease.instance)
    assert fetched is not None and fetched.expires_at == later

    # The reconciler's expiry (`expires_at <= now`) never ends a lease early.
    inv = Inventory(db)
    assert await inv.expire_leases(later.floor()) == []
    assert [e.instance for e in await inv.expire_leases(later.ceil())] == [lease.instance]


async def test_fifty_concurrent_claimers_never_share_an_instance(db: Database) -> None:
    await seed(db, "p", 30)
    # Ten stores (as if ten processes), five claims each: claims batch within a
    # store and contend across stores (FOR UPDATE SKIP LOCKED).
    stores = [LeaseStore(db) for _ in range(10)]
    expires = HOUR_ON
    results = await asyncio.gather(
        *(stores[i % 10].claim_free("p", f"tag{i}", NOW, expires) for i in range(50))
    )
    granted = [r.instance for r in results if r is not None]
    assert len(granted) == 30
    assert len(set(granted)) == 30
    rows = await db.fetch("SELECT instance, service_tag FROM leases")
    assert {r["instance"]: r["service_tag"] for r in rows} == {
        r.instance: r.service_tag for r in results if r is not None
    }
    assert await db.fetchval("SELECT count(*) FROM instances WHERE state='ready'") == 0


async def test_batched_returns_check_each_tag(db: Database) -> None:
    await seed(db, "p", 3)
    store = LeaseStore(db)
    hour = HOUR_ON
    a, b, c = [await store.claim_free("p", tag, NOW, hour) for tag in ("ta", "tb", "tc")]
    assert a and b and c
    outcomes = await asyncio.gather(
        store.return_lease(a.instance, "ta", NOW),
        store.return_lease(a.instance, "ta", NOW),  # the same return twice
        store.return_lease(c.instance, "wrong", NOW),
        store.return_lease(b.instance, "tb", NOW),
        store.return_lease("vmp-none", "tc", NOW),
        return_exceptions=True,
    )
    kinds = [type(o).__name__ for o in outcomes]
    assert sorted(kinds[:2]) == ["EndedLease", "NotLeased"]
    assert kinds[2:] == ["WrongTag", "EndedLease", "NotLeased"]
    left = {r["instance"] for r in await db.fetch("SELECT instance FROM leases")}
    assert left == {c.instance}
    assert await db.fetchval("SELECT count(*) FROM instances WHERE state = 'destroying'") == 2


@pytest.mark.parametrize("free", [5, 0])
async def test_a_reservation_is_used_once_even_when_retried_concurrently(
    db: Database, free: int
) -> None:
    await db.execute("INSERT INTO pools (name) VALUES ('p')")
    await seed(db, "p", free)
    store = LeaseStore(db)
    rid = uuid.uuid4()
    hour = NOW + timedelta(hours=1)
    outcomes = await asyncio.gather(
        *(store.claim_or_enqueue("p", "t", rid, NOW, HOUR_ON, hour) for _ in range(10)),
        return_exceptions=True,
    )
    firsts = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(firsts) == 1, outcomes
    assert all(isinstance(o, Duplicate) for o in outcomes if o is not firsts[0])
    leases = await db.fetchval("SELECT count(*) FROM leases WHERE reservation_id = $1", rid)
    queued = await db.fetchval("SELECT count(*) FROM reservations WHERE NOT served")
    if free:
        assert firsts[0] is not None and firsts[0].lease is not None
        assert (leases, queued) == (1, 0)
        assert await db.fetchval("SELECT count(*) FROM instances WHERE state='ready'") == free - 1
    else:
        assert firsts[0] is not None and firsts[0].seq is not None
        assert (leases, queued) == (0, 1)


async def test_fifty_queued_reservations_are_served_strictly_fifo(db: Database) -> None:
    await db.execute("INSERT INTO pools (name) VALUES ('p')")
    store = LeaseStore(db)
    inv = Inventory(db)
    rids = [uuid.uuid4() for _ in range(50)]
    later = NOW + timedelta(minutes=5)
    for rid in rids:  # enqueue order is the queue order
        first = await store.claim_or_enqueue(
            "p", "t", rid, NOW, Instant.from_datetime(later), later
        )
        assert first is not None and first.seq is not None
    # Instances become free in dribs and drabs while several workers set aside;
    # after each batch, those served must be exactly the head of the queue.
    served: set[str] = set()
    for batch in range(10):
        await seed(db, "p", 5, start=batch * 5)
        results = await asyncio.gather(*(inv.set_aside("p", NOW, 5) for _ in range(3)))
        served |= {rid for r in results for rid, _ in r}
        while len(served) < (batch + 1) * 5:
            more = await inv.set_aside("p", NOW, 5)
            assert more, "free instances and waiting reservations, yet nothing set aside"
            served |= {rid for rid, _ in more}
        assert served == {str(r) for r in rids[: (batch + 1) * 5]}
    # Each is then served from its own instance.
    leased = await asyncio.gather(*(store.serve_reserved(r, NOW, HOUR_ON) for r in rids))
    instances = [x[0].instance for x in leased if x is not None]
    assert len(set(instances)) == 50


async def test_free_instances_are_not_claimable_while_reservations_wait(db: Database) -> None:
    await db.execute("INSERT INTO pools (name) VALUES ('p')")
    store = LeaseStore(db)
    later = NOW + timedelta(minutes=5)
    await store.claim_or_enqueue("p", "t", uuid.uuid4(), NOW, Instant.from_datetime(later), later)
    await seed(db, "p", 1)
    assert await store.claim_free("p", "other", NOW, HOUR_ON) is None
    assert await Inventory(db).set_aside("p", NOW, 5) != []
    await seed(db, "p", 1, start=1)
    assert await store.claim_free("p", "other", NOW, HOUR_ON) is not None


async def _plan(db: Database, query: str, *args: object) -> str:
    rows = await db.fetch(f"EXPLAIN (FORMAT JSON) {query}", *args)
    return json.dumps(json.loads(rows[0][0]))


def _seq_scanned(plan: object) -> set[str]:
    """Relations read by a sequential scan anywhere in an EXPLAIN JSON plan."""
    found: set[str] = set()
    if isinstance(plan, dict):
        if plan.get("Node Type") == "Seq Scan":
            found.add(plan["Relation Name"])
        for value in plan.values():
            found |= _seq_scanned(value)
    elif isinstance(plan, list):
        for item in plan:
            found |= _seq_scanned(item)
    return found


@pytest.mark.parametrize("statement", ["claim", "claim_or_enqueue", "set_aside"])
async def test_hot_statements_use_the_partial_indexes(db: Database, statement: str) -> None:
    # Realistic volume: 100 pools x 100 ready instances, a long queue elsewhere.
    for p in range(100):
        await seed(db, f"pool{p}", 100)
    await db.execute(
        """INSERT INTO reservations (id, pool, service_tag, enqueued_at, expires_at)
           SELECT gen_random_uuid(), 'pool' || (i % 99 + 1), 't', $1::timestamptz,
                  $1::timestamptz + interval '5m'
           FROM generate_series(1, 10000) i""",
        NOW,
    )
    await db.execute("ANALYZE")
    if statement == "claim":
        plan = await _plan(
            db,
            leases_sql.CLAIM_FREE,
            "pool0",
            3,
            ["a", "b", "c"],
            [NOW] * 3,
            NOW,
            ["anonymous"] * 3,
            ["a", "b", "c"],
            [0] * 3,
            [0] * 3,
        )
    elif statement == "claim_or_enqueue":
        plan = await _plan(
            db,
            leases_sql.CLAIM_OR_ENQUEUE,
            "pool0",
            "t",
            uuid.uuid4(),
            NOW,
            NOW,
            NOW,
            "anonymous",
            "t",
            100,
            0,
            0,
        )
    else:
        plan = await _plan(db, inventory_sql.SET_ASIDE, "pool5", NOW)
    # `pools` holds one row per pool: scanning it is the right plan.
    assert _seq_scanned(json.loads(plan)) <= {"pools"}, plan
    assert "instances_free" in plan
    if statement == "set_aside":
        assert "reservations_waiting" in plan or "reservations_queue" in plan
