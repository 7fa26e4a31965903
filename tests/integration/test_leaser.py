"""Lease rules (spec section 3) end to end through the Leaser on a real database."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from tests.integration.helpers import World, make_world
from vmpool.core.instant import Instant
from vmpool.domain import leasing
from vmpool.store.db import Database
from vmpool.store.records import LeaseRow

POOLS = {
    "pools": [
        {"name": "alpha", "min_ready": 2, "max_size": 2, "reservation_ttl": "1m"},
        {"name": "beta", "min_ready": 1, "max_size": 3, "labels": {"b": "1"}},
    ]
}


def at(world: World, offset: timedelta, nanos: int = 0) -> Instant:
    """The world's now + offset, plus some nanoseconds."""
    return Instant(Instant.from_datetime(world.clock.now + offset).ns + nanos)


@pytest.fixture
async def world(db: Database) -> World:
    w = await make_world(db, POOLS)
    await w.settle()
    return w


async def test_lease_without_reservation_and_exhaustion(world: World) -> None:
    a = await world.leaser.lease("alpha", None, "t", None)
    b = await world.leaser.lease("alpha", None, "t", None)
    assert a.instance != b.instance
    assert a.expires_at == Instant.from_datetime(world.clock.now + timedelta(minutes=30))
    with pytest.raises(leasing.Exhausted, match='pool "alpha"'):
        await world.leaser.lease("alpha", None, "t", None)
    # Nothing was remembered: no queue entry.
    assert await world.db.fetchval("SELECT count(*) FROM reservations") == 0


async def test_unknown_pool_is_not_found(world: World) -> None:
    with pytest.raises(leasing.NotFound, match="pool"):
        await world.leaser.lease("gamma", None, "t", None)


async def test_empty_pool_picks_the_one_with_most_free(world: World) -> None:
    lease = await world.leaser.lease("", None, "t", None)
    assert lease.pool == "alpha"  # 2 free against 1
    lease = await world.leaser.lease("", None, "t", None)
    assert lease.pool == "alpha"  # 1 and 1: ties go by name


async def test_retried_reservation_returns_the_same_lease(world: World) -> None:
    rid = uuid.uuid4()
    first = await world.leaser.lease("alpha", None, "inctl", rid)
    world.clock.advance(seconds=20)
    again = await world.leaser.lease("alpha", None, "inctl", rid)
    assert again == first
    assert await world.db.fetchval("SELECT count(*) FROM leases") == 1
    with pytest.raises(leasing.PermissionDenied, match="service_tag"):
        await world.leaser.lease("alpha", None, "someone-else", rid)


async def test_reservation_queue_position_and_fifo(world: World) -> None:
    for _ in range(2):
        await world.leaser.lease("alpha", None, "t", None)
    rids = [uuid.uuid4() for _ in range(3)]
    for i, rid in enumerate(rids, start=1):
        with pytest.raises(leasing.Exhausted) as err:
            await world.leaser.lease("alpha", None, "t", rid)
        assert str(err.value) == (
            f'reservation {rid} is queued at position {i} of {i} in pool "alpha"'
        )
    # Position is stable for a retry; the queue does not grow.
    with pytest.raises(leasing.Exhausted, match="position 2 of 3"):
        await world.leaser.lease("alpha", None, "t", rids[1])
    # Return one: its replacement goes to the head of the queue, not to a newcomer.
    held = await world.db.fetchval("SELECT instance FROM leases LIMIT 1")
    await world.leaser.return_(held, "t")
    await world.settle()
    with pytest.raises(leasing.Exhausted):
        await world.leaser.lease("alpha", None, "t", None)
    with pytest.raises(leasing.Exhausted, match="position 2 of 3"):
        await world.leaser.lease("alpha", None, "t", rids[1])
    first = await world.leaser.lease("alpha", None, "t", rids[0])
    assert first.reservation_id == rids[0]
    with pytest.raises(leasing.Exhausted, match="position 1 of 2"):
        await world.leaser.lease("alpha", None, "t", rids[1])


async def test_queued_reservations_are_demand(db: Database) -> None:
    w = await make_world(db, {"pools": [{"name": "p", "min_ready": 0, "max_size": 5}]})
    await w.settle()
    assert await w.counts("p") == {}
    rids = [uuid.uuid4() for _ in range(3)]
    for rid in rids:
        with pytest.raises(leasing.Exhausted):
            await w.leaser.lease("p", None, "t", rid)
    await w.settle()
    assert await w.counts("p") == {"reserved": 3}
    leases = [await w.leaser.lease("p", None, "t", rid) for rid in rids]
    assert len({x.instance for x in leases}) == 3


async def test_expired_reservation_passes_its_instance_on(world: World) -> None:
    for _ in range(2):
        await world.leaser.lease("alpha", None, "t", None)
    late, next_ = uuid.uuid4(), uuid.uuid4()
    for rid in (late, next_):
        with pytest.raises(leasing.Exhausted):
            await world.leaser.lease("alpha", None, "t", rid)
    held = await world.db.fetchval("SELECT instance FROM leases LIMIT 1")
    await world.leaser.return_(held, "t")
    await world.settle()
    set_aside = await world.db.fetchval("SELECT instance FROM reservations WHERE id = $1", late)
    assert set_aside is not None
    # `late` never comes back; `next_` keeps renewing.
    world.clock.advance(seconds=40)
    with pytest.raises(leasing.Exhausted):
        await world.leaser.lease("alpha", None, "t", next_)
    world.clock.advance(seconds=30)
    await world.settle()
    lease = await world.leaser.lease("alpha", None, "t", next_)
    assert lease.instance == set_aside  # the same VM, not destroyed: nobody used it


async def _waiting_in_full_alpha(
    db: Database, recheck: str
) -> tuple[World, uuid.UUID, asyncio.Task[LeaseRow]]:
    """Both of alpha's instances leased, and a Lease with a new reservation
    waiting up to 60 s, re-reading it every ``recheck``."""
    world = await make_world(db, {**POOLS, "limits": {"wait_recheck": recheck}})
    await world.settle()
    for _ in range(2):
        await world.leaser.lease("alpha", None, "t", None)
    rid = uuid.uuid4()
    waiting = asyncio.create_task(
        world.leaser.lease("alpha", None, "t", rid, wait=timedelta(seconds=60))
    )
    return world, rid, waiting


async def test_waiting_lease_is_woken_by_the_set_aside(db: Database) -> None:
    """Only the wake-up can answer this call in time: it waits up to 60 s and
    re-reads its reservation once an hour, and it is given 30 s."""
    world, rid, waiting = await _waiting_in_full_alpha(db, "1h")
    while not len(world.waiters):  # queued and waiting
        assert not waiting.done(), waiting
        await asyncio.sleep(0)
    held = await world.db.fetchval("SELECT instance FROM leases LIMIT 1")
    await world.leaser.return_(held, "t")
    await world.settle()
    lease = await asyncio.wait_for(waiting, 30)
    assert lease.reservation_id == rid


async def test_served_reservation_after_its_lease_ended(world: World) -> None:
    rid = uuid.uuid4()
    lease = await world.leaser.lease("alpha", None, "t", rid)
    await world.leaser.return_(lease.instance, "t")
    with pytest.raises(leasing.FailedPrecondition, match="reservation_id"):
        await world.leaser.lease("alpha", None, "t", rid)


async def test_reservation_in_another_pool_is_refused(world: World) -> None:
    rid = uuid.uuid4()
    await world.leaser.lease("alpha", None, "t", rid)
    with pytest.raises(leasing.InvalidArgument, match="reservation_id"):
        await world.leaser.lease("beta", None, "t", rid)


async def test_return_and_extend_rules(world: World) -> None:
    lease = await world.leaser.lease("alpha", None, "t", None)
    with pytest.raises(leasing.PermissionDenied):
        await world.leaser.return_(lease.instance, "other")
    with pytest.raises(leasing.PermissionDenied):
        await world.leaser.extend_to(lease.instance, at(world, timedelta(hours=1)), "x", False)
    later = at(world, timedelta(hours=3), nanos=789)
    extended = await world.leaser.extend_to(lease.instance, later, "t", False)
    assert extended.expires_at == later
    sooner = at(world, timedelta(minutes=5), nanos=1)
    same = await world.leaser.extend_to(lease.instance, sooner, "t", True)
    assert same.expires_at == later
    shorter = await world.leaser.extend_to(lease.instance, sooner, "t", False)
    assert shorter.expires_at == sooner
    capped = await world.leaser.extend_to(lease.instance, at(world, timedelta(days=30)), "t", False)
    assert capped.expires_at == at(world, timedelta(hours=24))
    assert (await world.leaser.get(lease.instance)).expires_at == capped.expires_at
    await world.leaser.return_(lease.instance, "t")
    with pytest.raises(leasing.NotFound):
        await world.leaser.return_(lease.instance, "t")
    with pytest.raises(leasing.NotFound):
        await world.leaser.get(lease.instance)
    end = await world.db.fetchrow(
        "SELECT end_reason FROM lease_history WHERE instance = $1", lease.instance
    )
    assert end["end_reason"] == "returned"


async def test_a_paused_pool_refuses_leases(world: World) -> None:
    # What PausePool writes (vmpool/api/pool_api.py): the desired status.
    await world.db.execute("UPDATE pools SET desired_status = 'PAUSED' WHERE name = 'beta'")
    with pytest.raises(leasing.FailedPrecondition, match="PAUSED"):
        await world.leaser.lease("beta", None, "t", None)
    with pytest.raises(leasing.FailedPrecondition, match="PAUSED"):
        await world.leaser.lease("beta", None, "t", uuid.uuid4())
    await world.settle()
    assert await world.counts("beta") == {}
    await world.db.execute("UPDATE pools SET desired_status = 'RUNNING' WHERE name = 'beta'")
    await world.settle()
    assert (await world.leaser.lease("beta", None, "t", None)).pool == "beta"


async def test_the_empty_service_tag_is_a_tag_like_any_other(world: World) -> None:
    lease = await world.leaser.lease("alpha", None, "", None)
    assert lease.service_tag == ""
    with pytest.raises(leasing.PermissionDenied, match="service_tag"):
        await world.leaser.return_(lease.instance, "inctl")
    extended = await world.leaser.extend_to(
        lease.instance, at(world, timedelta(hours=1)), "", False
    )
    assert extended.instance == lease.instance
    await world.leaser.return_(lease.instance, "")

    rid = uuid.uuid4()
    first = await world.leaser.lease("alpha", None, "", rid)
    assert await world.leaser.lease("alpha", None, "", rid) == first
    with pytest.raises(leasing.PermissionDenied, match="service_tag"):
        await world.leaser.lease("alpha", None, "inctl", rid)
    tagged = await world.leaser.lease("beta", None, "inctl", None)
    with pytest.raises(leasing.PermissionDenied, match="service_tag"):
        await world.leaser.extend_to(tagged.instance, at(world, timedelta(hours=1)), "", False)


async def test_expiry_as_asked_is_kept_to_the_nanosecond_on_every_path(world: World) -> None:
    asked = at(world, timedelta(hours=1), nanos=999)
    plain = await world.leaser.lease("alpha", asked, "t", None)
    assert plain.expires_at == asked
    assert (await world.leaser.get(plain.instance)).expires_at == asked

    # A new reservation id served at once, then retried (rule 1: the same lease).
    rid = uuid.uuid4()
    reserved = await world.leaser.lease("alpha", at(world, timedelta(hours=2), 1), "t", rid)
    assert reserved.expires_at == at(world, timedelta(hours=2), 1)
    world.clock.advance(seconds=20)
    again = await world.leaser.lease("alpha", at(world, timedelta(hours=2), 5), "t", rid)
    assert again == reserved

    # Queued, an instance set aside, then served (rule 2).
    queued = uuid.uuid4()
    with pytest.raises(leasing.Exhausted):
        await world.leaser.lease("alpha", None, "t", queued)
    await world.leaser.return_(plain.instance, "t")
    await world.settle()
    wanted = at(world, timedelta(minutes=45), nanos=123_456_789 % 1000)
    served = await world.leaser.lease("alpha", wanted, "t", queued)
    assert served.expires_at == wanted

    # ExtendTo as asked, and extend_only compares to the nanosecond.
    target = at(world, timedelta(hours=3), nanos=1)
    assert (await world.leaser.extend_to(served.instance, target, "t", False)).expires_at == target
    later = Instant(target.ns + 1)
    assert (await world.leaser.extend_to(served.instance, later, "t", True)).expires_at == later
    assert (await world.leaser.extend_to(served.instance, target, "t", True)).expires_at == later
    assert (await world.leaser.get(served.instance)).expires_at == later

    # A capped value is the cap (max_lease 24h by default).
    capped = await world.leaser.extend_to(
        served.instance, at(world, timedelta(days=3), 7), "t", False
    )
    assert capped.expires_at == at(world, timedelta(hours=24))


async def _blocked_leases_table(db: Database) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """Hold a lock that makes every INSERT INTO leases wait until released: a
    claim's statement is then under way (and commits) after its caller left."""
    release = asyncio.Event()
    locked = asyncio.Event()

    async def hold() -> None:
        async with db.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE leases IN SHARE ROW EXCLUSIVE MODE")
            locked.set()
            await release.wait()

    task = asyncio.create_task(hold())
    await locked.wait()
    return release, task


async def test_a_lease_cancelled_by_its_deadline_while_its_batch_commits_leaves_no_lease(
    world: World,
) -> None:
    free_before = await world.db.fetchval("SELECT count(*) FROM instances WHERE state = 'ready'")
    release, holder = await _blocked_leases_table(world.db)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(world.leaser.lease("alpha", None, "t", None), 0.2)
    finally:
        release.set()
        await holder
    await world.store.drain()  # the batch commits, then the claim is undone
    assert await world.inventory.list_leases("") == []
    free = await world.db.fetchval("SELECT count(*) FROM instances WHERE state = 'ready'")
    assert free == free_before  # back in the pool, not destroyed
    assert world.metrics.abandoned_claims.labels("alpha")._value.get() == 1
    lease = await world.leaser.lease("alpha", None, "t", None)  # and it can be leased again
    assert lease.pool == "alpha"


async def test_a_reservation_served_to_a_waiter_that_left_keeps_its_lease(world: World) -> None:
    rid = uuid.uuid4()
    release, holder = await _blocked_leases_table(world.db)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(world.leaser.lease("alpha", None, "t", rid), 0.2)
    finally:
        release.set()
        await holder
    await world.store.drain()
    # Whether the statement was cancelled with its caller or committed anyway,
    # the client's retry with the same reservation gets one lease, and no
    # second instance is taken: a committed lease stays with the reservation.
    before = await world.inventory.list_leases("")
    assert [lease.reservation_id for lease in before] in ([], [rid])
    retry = await world.leaser.lease("alpha", None, "t", rid)
    assert retry.reservation_id == rid
    if before:
        assert retry.instance == before[0].instance
    leases = await world.inventory.list_leases("")
    assert [(lease.instance, lease.reservation_id) for lease in leases] == [(retry.instance, rid)]
    assert world.metrics.abandoned_claims.labels("alpha")._value.get() == 0


async def test_a_waiting_call_keeps_its_reservation_alive_and_hears_of_a_pause(
    db: Database,
) -> None:
    """Its rechecks (one statement each while it stays queued) push the queue
    entry's expiry on with the clock, and the first recheck after the pool
    stops being RUNNING refuses the call, as its first look would have."""
    world, rid, waiting = await _waiting_in_full_alpha(db, "20ms")
    expiry = "SELECT expires_at FROM reservations WHERE id = $1"
    while (first := await db.fetchval(expiry, rid)) is None:
        assert not waiting.done(), waiting
        await asyncio.sleep(0.01)
    world.clock.advance(seconds=30)
    while await db.fetchval(expiry, rid) == first:
        assert not waiting.done(), waiting
        await asyncio.sleep(0.01)
    assert await db.fetchval(expiry, rid) == world.clock.now + timedelta(minutes=1)
    await db.execute("UPDATE pools SET desired_status = 'PAUSED' WHERE name = 'alpha'")
    with pytest.raises(leasing.FailedPrecondition, match="alpha"):
        await asyncio.wait_for(waiting, 30)
