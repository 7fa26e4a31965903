"""Ownership and quotas in the database (identity.md sections 3 and 5): the
principal and the tag must both match, and a quota holds inside the statement
that would exceed it, across processes (several stores on one database)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from tests.integration.test_store import NOW, seed
from vmpool.core.instant import Instant
from vmpool.ops.audit import RECONCILER
from vmpool.store.db import Database
from vmpool.store.errors import QuotaExceeded
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore, WrongPrincipal, WrongTag
from vmpool.store.records import Owner

HOUR = NOW + timedelta(hours=1)
HOUR_ON = Instant.from_datetime(HOUR)  # a lease's expiry


def alice(tag: str = "ci", **kw: int) -> Owner:
    return Owner("alice", tag, "alice", **kw)


async def test_return_and_extend_need_the_same_principal_and_tag(db: Database) -> None:
    await seed(db, "p", 2)
    store = LeaseStore(db)
    lease = await store.claim_free("p", "ci", NOW, HOUR_ON, alice())
    assert lease is not None and lease.principal == "alice"
    with pytest.raises(WrongPrincipal):
        await store.return_lease(lease.instance, "ci", NOW, principal="mallory")
    with pytest.raises(WrongTag):
        await store.return_lease(lease.instance, "other", NOW, principal="alice")
    with pytest.raises(WrongPrincipal):
        await store.extend(lease.instance, "ci", lambda _: HOUR_ON, "mallory")
    ended = await store.return_lease(lease.instance, "ci", NOW, principal="alice")
    assert ended.principal == "alice"
    history = await db.fetch("SELECT principal FROM lease_history")
    assert [r["principal"] for r in history] == ["alice"]


async def test_history_records_the_owner_and_who_ended_each_lease(db: Database) -> None:
    """Returned: the caller; stopped: the operator; expired or vanished: the
    reconciler's fixed name. The owner's principal is kept beside it."""
    await seed(db, "p", 4)
    store, inventory = LeaseStore(db), Inventory(db)
    leases = [await store.claim_free("p", "ci", NOW, HOUR_ON, alice()) for _ in range(4)]
    returned, stopped, expiring, vanishing = [lease.instance for lease in leases if lease]
    await store.return_lease(returned, "ci", NOW, principal="alice")
    await store.force_return(stopped, NOW, "StopLease", by="ops")
    await db.execute("UPDATE leases SET expires_at = $2 WHERE instance = $1", expiring, NOW)
    assert [e.principal for e in await inventory.expire_leases(NOW)] == ["alice"]
    gone = await inventory.vanished([vanishing], NOW)
    assert [(g[0], g[4]) for g in gone] == [(vanishing, "alice")]
    rows = await db.fetch("SELECT instance, principal, ended_by, end_reason FROM lease_history")
    assert {r["instance"]: (r["principal"], r["ended_by"], r["end_reason"]) for r in rows} == {
        returned: ("alice", "alice", "returned"),
        stopped: ("alice", "ops", "StopLease"),
        expiring: ("alice", RECONCILER, "expired"),
        vanishing: ("alice", RECONCILER, "vm vanished"),
    }


async def test_a_reservation_records_its_principal(db: Database) -> None:
    await db.execute("INSERT INTO pools (name) VALUES ('p')")
    store = LeaseStore(db)
    rid = uuid.uuid4()
    await store.claim_or_enqueue("p", "ci", rid, NOW, HOUR_ON, HOUR, alice(max_queued=5))
    state = await store.lookup_reservation(rid)
    assert state is not None and state.principal == "alice" and state.kind == "queued"


async def test_queue_quota_holds_across_concurrent_processes(db: Database) -> None:
    await db.execute("INSERT INTO pools (name) VALUES ('p')")
    stores = [LeaseStore(db) for _ in range(5)]

    async def enqueue(i: int, owner: Owner) -> str:
        try:
            await stores[i % 5].claim_or_enqueue(
                "p", owner.service_tag, uuid.uuid4(), NOW, HOUR_ON, HOUR, owner
            )
        except QuotaExceeded as err:
            return str(err)
        return "queued"

    results = await asyncio.gather(*(enqueue(i, alice(max_queued=7)) for i in range(30)))
    assert results.count("queued") == 7
    refused = [r for r in results if r != "queued"]
    assert refused[0] == 'owner "alice" has 7 queued reservations in pool "p", the limit'
    # Another owner is not affected; nothing was written for the refused ones.
    assert await enqueue(0, Owner("bob", "ci", "bob", max_queued=7)) == "queued"
    counts = await db.fetch("SELECT owner, count(*) AS n FROM reservations GROUP BY owner")
    assert {r["owner"]: r["n"] for r in counts} == {"alice": 7, "bob": 1}


async def test_active_lease_quota_refuses_and_changes_nothing(db: Database) -> None:
    await seed(db, "p", 5)
    store = LeaseStore(db)
    owner = alice(max_active=2)
    got = await asyncio.gather(
        *(store.claim_free("p", "ci", NOW, HOUR_ON, owner) for _ in range(4)),
        return_exceptions=True,
    )
    assert sum(1 for g in got if not isinstance(g, BaseException)) == 2
    assert sum(1 for g in got if isinstance(g, QuotaExceeded)) == 2
    ready = await db.fetchval("SELECT count(*) FROM instances WHERE state = 'ready'")
    assert ready == 3  # refused claims took no instance
    # Unlimited callers still share the batched path.
    assert await store.claim_free("p", "x", NOW, HOUR_ON) is not None


async def test_serving_a_reservation_respects_the_lease_quota(db: Database) -> None:
    names = await seed(db, "p", 2)
    store = LeaseStore(db)
    owner = alice(max_active=1, max_queued=5)
    # Queue a reservation (nothing free: both instances go to a first lease and
    # to a reservation set aside by hand, as the reconciler would).
    assert await store.claim_free("p", "ci", NOW, HOUR_ON, owner) is not None
    rid = uuid.uuid4()
    await db.execute(
        "UPDATE instances SET state = 'reserved', reservation_id = $1 WHERE name = $2",
        rid,
        names[1],
    )
    await db.execute(
        """INSERT INTO reservations (id, pool, service_tag, enqueued_at, expires_at,
                                     instance, principal, owner, queue_limit)
           VALUES ($1, 'p', 'ci', $2, $3, $4, 'alice', 'alice', 5)""",
        rid,
        NOW,
        HOUR,
        names[1],
    )
    with pytest.raises(QuotaExceeded, match='owner "alice" has 1 active leases, the limit'):
        await store.serve_reserved(rid, NOW, HOUR_ON, owner.max_active)
    # Nothing changed: the reservation keeps its instance for a later retry.
    state = await store.lookup_reservation(rid)
    assert state is not None and state.kind == "queued" and state.instance == names[1]
    served = await store.serve_reserved(rid, NOW, HOUR_ON, 2)
    assert served is not None and served[0].principal == "alice"


async def test_the_quota_functions_run_only_for_rows_with_a_limit(db: Database) -> None:
    """Migration 0070: with no quota (limit 0) a claim does not call the lease
    quota function at all; with one it does (and still enforces it)."""
    await seed(db, "p", 4)
    store = LeaseStore(db)
    calls = "SELECT pg_stat_get_xact_function_calls('vmpool_lease_quota'::regproc)"
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL track_functions = 'pl'")
        await conn.execute(
            "INSERT INTO leases (instance, pool, service_tag, leased_at, expires_at, owner) "
            "SELECT name, pool, 'ci', now(), now() + interval '1 hour', 'alice' "
            "FROM instances WHERE pool = 'p' LIMIT 1"
        )
        assert await conn.fetchval(calls) is None  # never called
        await conn.execute(
            "INSERT INTO leases (instance, pool, service_tag, leased_at, expires_at, owner,"
            " lease_limit) SELECT name, pool, 'ci', now(), now() + interval '1 hour', 'alice', 5"
            " FROM instances WHERE pool = 'p' AND name NOT IN (SELECT instance FROM leases)"
            " LIMIT 1"
        )
        assert await conn.fetchval(calls) == 1
        await conn.execute(
            "UPDATE instances SET state = 'leased' WHERE name IN (SELECT instance FROM leases)"
        )
    # alice holds 2: a limit of 3 admits one more and refuses the next.
    assert await store.claim_free("p", "ci", NOW, HOUR_ON, alice(max_active=3)) is not None
    with pytest.raises(QuotaExceeded):
        await store.claim_free("p", "ci", NOW, HOUR_ON, alice(max_active=3))
