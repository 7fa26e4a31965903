"""The reconciler with the fake provider on a real database (spec sections 5-6)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import structlog
import structlog.testing

from tests.integration.helpers import World, make_world
from tests.polling import eventually
from vmpool.control.executor import new_instance_name
from vmpool.domain import leasing
from vmpool.domain.spec_hash import pool_spec_hash
from vmpool.providers.errors import ProviderError
from vmpool.store.control import Control
from vmpool.store.db import Database
from vmpool.store.errors import NotLeader
from vmpool.store.inventory import Inventory

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


async def sync_pools_for(db: Database, *names: str) -> None:
    await Inventory(db).sync_pools([(n, {}) for n in names])


async def test_fills_pools_within_limits(db: Database) -> None:
    w = await make_world(
        db, {"pools": [{"name": "p", "min_ready": 6, "max_size": 10, "max_provisioning": 4}]}
    )
    await w.full_pass()
    await w.reconciler.drain_calls()
    assert await w.counts("p") == {"provisioning": 4}
    await w.settle()
    assert await w.counts("p") == {"ready": 6}
    assert await w.vms() == await w.rows()
    assert all(name.startswith("vmp-") for name in await w.rows())


async def test_expired_lease_destroys_the_vm_and_refills(db: Database) -> None:
    w = await make_world(db, {"pools": [{"name": "p", "min_ready": 1, "max_size": 2}]})
    await w.settle()
    lease = await w.leaser.lease("p", None, "t", None)
    w.clock.advance(minutes=31)
    with structlog.testing.capture_logs() as logs:
        await w.settle()
    assert lease.instance not in await w.vms()
    assert lease.instance not in await w.rows()
    assert await w.counts("p") == {"ready": 1}
    ended = await db.fetchrow(
        "SELECT end_reason, ended_by FROM lease_history WHERE instance = $1", lease.instance
    )
    assert tuple(ended) == ("expired", "vmpool:reconciler")
    # One audit line for the lease the reconciler ended: who, which lease, where.
    audits = [e for e in logs if e["event"] == "audit"]
    assert len(audits) == 1
    assert {
        "action": "ExpireLease",
        "principal": "vmpool:reconciler",
        "instance": lease.instance,
        "pool": "p",
        "service_tag": "t",
        "outcome": "ok",
    }.items() <= audits[0].items()


async def test_boot_failures_are_replaced_with_backoff(db: Database) -> None:
    w = await make_world(
        db,
        {
            "provider": {"kind": "fake", "fake": {"boot_seconds": 0, "failure_rate": 1.0}},
            "pools": [{"name": "p", "min_ready": 2, "max_size": 4}],
        },
    )
    seen: set[str] = set()  # every VM name that existed at some point
    for _ in range(30):
        await w.full_pass()
        await w.reconciler.drain_calls()
        seen |= await w.vms() | await w.rows()
    # Backoff holds after the first failures: no hot loop creating VMs (the
    # monotonic clock stands still: thirty passes inside the first backoff).
    made = w.metrics.reconcile_actions.labels("create")
    assert made._value.get() == 2, "a pool whose VMs never boot was retried at once"
    assert len(seen) == 2, seen
    w.clock.advance(seconds=5)  # the first backoff is at most 5 s
    await w.settle_once()
    assert made._value.get() == 4  # then it tries again
    assert await w.vms() == await w.rows()
    assert (await w.counts("p")).get("ready", 0) == 0


async def test_boot_timeout(db: Database) -> None:
    w = await make_world(
        db,
        {
            "provider": {"kind": "fake", "fake": {"boot_seconds": 3600}},
            "pools": [{"name": "p", "min_ready": 1, "max_size": 1, "boot_timeout": "5m"}],
        },
    )
    await w.settle()
    first = await w.rows()
    assert await w.counts("p") == {"provisioning": 1}
    w.clock.advance(minutes=6)
    await w.settle()
    assert first.isdisjoint(await w.vms())
    assert first.isdisjoint(await w.rows())
    assert w.metrics.reconcile_actions.labels("boot_failed")._value.get() == 1


async def test_vm_deleted_behind_our_back(db: Database) -> None:
    w = await make_world(db, {"pools": [{"name": "p", "min_ready": 2, "max_size": 3}]})
    await w.settle()
    lease = await w.leaser.lease("p", None, "t", None)
    free = next(iter(await w.rows() - {lease.instance}))
    await db.execute("DELETE FROM fake_vms WHERE name = ANY($1::text[])", [free, lease.instance])
    w.reconciler.resync_soon()  # the periodic full comparison is due
    await w.settle()
    assert free not in await w.rows()
    assert lease.instance not in await w.rows()
    reason = await db.fetchval(
        "SELECT end_reason FROM lease_history WHERE instance = $1", lease.instance
    )
    assert reason == "vm vanished"
    assert await w.counts("p") == {"ready": 2}
    assert await w.vms() == await w.rows()


async def test_orphans_are_deleted_after_the_grace(db: Database) -> None:
    w = await make_world(db, {"pools": [{"name": "p", "min_ready": 1, "max_size": 1}]})
    await w.settle()
    await db.execute(
        "INSERT INTO fake_vms (name, pool, created_at, ready_at) VALUES ('vmp-orph-an', 'p', now(), now())"
    )
    w.reconciler.resync_soon()
    await w.settle()
    assert "vmp-orph-an" in await w.vms()  # within the grace: left alone
    w.clock.advance(minutes=11)
    w.reconciler.resync_soon()
    await w.settle()
    w.reconciler.resync_soon()
    await w.settle()
    assert "vmp-orph-an" not in await w.vms()
    assert await w.vms() == await w.rows()


async def test_removing_a_pool_drains_it(db: Database) -> None:
    w = await make_world(
        db,
        {
            "pools": [
                {"name": "keep", "min_ready": 1, "max_size": 1},
                {"name": "gone", "min_ready": 2, "max_size": 2},
            ]
        },
    )
    await w.settle()
    lease = await w.leaser.lease("gone", None, "t", None)
    w2 = await make_world(db, {"pools": [{"name": "keep", "min_ready": 1, "max_size": 1}]})
    await w2.settle()
    assert await w2.counts("gone") == {"leased": 1}  # the lease runs to its end
    assert await w2.counts("keep") == {"ready": 1}
    w2.clock.advance(minutes=31)
    await w2.settle()
    assert await w2.counts("gone") == {}
    assert lease.instance not in await w2.vms()


async def test_ready_instances_are_recycled_after_max_ready_age(db: Database) -> None:
    w = await make_world(
        db, {"pools": [{"name": "p", "min_ready": 2, "max_size": 2, "max_ready_age": "1h"}]}
    )
    await w.settle()
    old = await w.rows()
    w.clock.advance(minutes=61)
    await w.settle()
    assert len(await w.rows()) == 2
    assert old.isdisjoint(await w.rows())


async def _until(cond: Callable[[], bool], within: float, what: str) -> None:
    async def probe() -> bool:
        return cond()

    await eventually(probe, bool, within, what, interval=0.02)


async def _leader_of(controls: list[Control], within: float = 5.0) -> Control:
    await _until(lambda: sum(c.is_leader() for c in controls) == 1, within, "one leader")
    return next(c for c in controls if c.is_leader())


@contextlib.asynccontextmanager
async def _running(
    db_url: str, n: int, ttl: float, thaw: asyncio.Event | None = None
) -> AsyncIterator[tuple[list[Control], list[asyncio.Event]]]:
    """``n`` control loops on one database (0.1 s interval), all stopped and
    closed at the end (``thaw`` set first, so a frozen one can stop)."""
    stops = [asyncio.Event() for _ in range(n)]
    controls = [Control(db_url, 0.1, lambda: None, lambda _: None, ttl=ttl) for _ in stops]
    tasks = [asyncio.create_task(c.run(s)) for c, s in zip(controls, stops, strict=True)]
    try:
        yield controls, stops
    finally:
        if thaw is not None:
            thaw.set()
        for s in stops:
            s.set()
        await asyncio.gather(*tasks)
        for c in controls:
            await c.close()


def _freeze(control: Control, thaw: asyncio.Event) -> None:
    """As SIGSTOP: its session stays open, it renews nothing until ``thaw``."""

    async def frozen(conn: object) -> None:
        await thaw.wait()

    control._acquire_or_renew = frozen  # type: ignore[method-assign]


async def test_one_leader_and_a_quick_takeover_when_its_session_dies(db_url: str) -> None:
    async with _running(db_url, 3, ttl=30) as (controls, stops):
        leader = await _leader_of(controls)
        first_term = leader.fence()
        assert first_term is not None
        # As if its process died: the session ends, nothing is released.
        assert leader._conn is not None
        leader._conn.terminate()
        stops[controls.index(leader)].set()
        others = [c for c in controls if c is not leader]
        # Far sooner than the 30 s ttl: the dead session's advisory lock is free.
        new = await _leader_of(others, within=0.1 * 2 + 1)
        term = new.fence()
        assert term is not None and term[1] > first_term[1]


async def test_a_frozen_leader_is_replaced_after_its_ttl_and_stops_trusting_itself(
    db_url: str,
) -> None:
    thaw = asyncio.Event()
    async with _running(db_url, 2, ttl=1.0, thaw=thaw) as (controls, _):
        leader = await _leader_of(controls)
        follower = next(c for c in controls if c is not leader)
        _freeze(leader, thaw)
        start = time.monotonic()
        await _until(follower.is_leader, 1.0 + 2, "takeover after the ttl")
        assert time.monotonic() - start >= 0.3, "took over while the term was still valid"
        assert not leader.is_leader()  # its own trust ended with the ttl, less a margin
        assert leader.fence() is None


async def test_a_thawed_leader_does_not_take_its_term_back(db_url: str) -> None:
    """A leader frozen past its ttl still holds the advisory lock on its open
    session when it wakes. That lock proves nothing then: the follower that took
    the expired term keeps it, and the thawed process lets go of the lock so the
    new leader can hold it (and be replaced at once if it dies)."""
    thaw = asyncio.Event()
    async with _running(db_url, 2, ttl=1.0, thaw=thaw) as (controls, _):
        leader = await _leader_of(controls)
        follower = next(c for c in controls if c is not leader)
        _freeze(leader, thaw)
        await _until(follower.is_leader, 1.0 + 2, "takeover after the ttl")
        term = follower.fence()
        assert term is not None
        del leader._acquire_or_renew  # SIGCONT: renewing again, lock still held
        thaw.set()
        await _until(lambda: follower._locked, 3, "the new leader holds the lock")
        assert follower.fence() == term, "the thawed leader took the term back"
        assert not leader.is_leader()


async def test_a_released_term_is_taken_over_at_once(db_url: str) -> None:
    async with _running(db_url, 2, ttl=30) as (controls, stops):
        leader = await _leader_of(controls)
        stops[controls.index(leader)].set()  # graceful: the term is released
        follower = next(c for c in controls if c is not leader)
        await _until(follower.is_leader, 2, "takeover")  # far sooner than the 30 s ttl


async def test_writes_of_a_leader_whose_term_ended_fail(db: Database, db_url: str) -> None:
    stops = [asyncio.Event() for _ in range(2)]
    controls = [Control(db_url, 0.1, lambda: None, lambda _: None, ttl=0.6) for _ in stops]
    tasks = [asyncio.create_task(controls[0].run(stops[0]))]
    try:
        old = await _leader_of(controls[:1], within=30)  # waits for it; a slow machine is slow
        await sync_pools_for(db, "p")
        token: tuple[str, int] | None = None

        async def write_while_leading() -> list[str]:
            # With a 0.6 s ttl a loaded machine may let a term lapse before the
            # write (then refused, rightly): write again under the current term.
            nonlocal token
            token = old.fence()
            if token is None:
                return []
            with contextlib.suppress(NotLeader):
                return await Inventory(db, fence=lambda: token).add_instances(
                    "p", ["vmp-old-1"], NOW, "h", 5
                )
            return []

        await eventually(write_while_leading, lambda w: w == ["vmp-old-1"], 30, "a leader's write")
        stale = Inventory(db, fence=lambda: token)  # what the old leader still believes
        # The old leader is cut off (SIGSTOP, partition): its term runs out and
        # another process takes over.
        assert old._conn is not None
        old._conn.terminate()
        stops[0].set()
        await tasks[0]
        tasks.append(asyncio.create_task(controls[1].run(stops[1])))
        await _leader_of(controls[1:], within=30)
        with pytest.raises(NotLeader):
            await stale.add_instances("p", ["vmp-old-2"], NOW, "h", 5)
        with pytest.raises(NotLeader):
            await stale.mark_destroying(["vmp-old-1"], "x", NOW, ("provisioning",))
        # The writes that carry the fence in their own statement (one round trip).
        with pytest.raises(NotLeader):
            await stale.mark_ready([("vmp-old-1", "zone-a")], NOW)
        await db.execute(
            "INSERT INTO instances (name, pool, state, created_at, state_changed_at)"
            " VALUES ('vmp-old-3', 'p', 'destroying', $1, $1)",
            NOW,
        )
        with pytest.raises(NotLeader):
            await stale.forget(["vmp-old-3"])
        rows = await db.fetch("SELECT name, state FROM instances ORDER BY name")
        assert [(r["name"], r["state"]) for r in rows] == [
            ("vmp-old-1", "provisioning"),
            ("vmp-old-3", "destroying"),
        ]
        # The new leader's own writes go through.
        fresh = Inventory(db, fence=controls[1].fence)
        assert await fresh.mark_ready([("vmp-old-1", "zone-a")], NOW) != []
        await fresh.forget(["vmp-old-3"])
        rows = await db.fetch("SELECT name, state FROM instances ORDER BY name")
        assert [(r["name"], r["state"]) for r in rows] == [("vmp-old-1", "ready")]
    finally:
        for s in stops:
            s.set()
        await asyncio.gather(*tasks)
        for c in controls:
            await c.close()


def test_instance_names_look_like_inctl_expects() -> None:
    name = new_instance_name("small")
    assert name.startswith("vmp-")
    assert len(name) == len("vmp-3f30-x9t7q72u")
    assert name == name.lower()
    assert name != new_instance_name("small")


async def test_event_driven_pass_refills_the_pool_it_was_woken_for(db: Database) -> None:
    w = await make_world(
        db,
        {
            "reconcile_interval": "1h",  # no periodic full pass during the test
            "pools": [
                {"name": "a", "min_ready": 1, "max_size": 2},
                {"name": "b", "min_ready": 1, "max_size": 2},
            ],
        },
    )
    await w.settle()
    lease_a = await w.leaser.lease("a", None, "t", None)
    lease_b = await w.leaser.lease("b", None, "t", None)
    w.inbox.put("a")  # what the serving thread does after a lease in "a"
    await w.reconciler.pass_once()
    await w.reconciler.drain_calls()
    assert (await w.counts("a")).get("provisioning", 0) == 1
    assert (await w.counts("b")).get("provisioning", 0) == 0  # not looked at: not woken
    await w.settle()
    assert await w.counts("a") == {"leased": 1, "ready": 1}
    assert await w.counts("b") == {"leased": 1, "ready": 1}
    assert lease_a.instance != lease_b.instance


async def test_a_changed_template_replaces_free_instances_new_first(db: Database) -> None:
    base = {"name": "p", "min_ready": 2, "max_size": 5, "max_provisioning": 2}
    w = await make_world(db, {"pools": [base]})
    await w.settle()
    lease = await w.leaser.lease("p", None, "t", None)
    await w.settle()
    old_free = await w.rows() - {lease.instance}
    w2 = await make_world(db, {"pools": [{**base, "template": {"spec": {"v": 2}}}]})
    new_hash = pool_spec_hash(w2.config.pools[0])
    await w2.full_pass()
    await w2.reconciler.drain_calls()
    # New first: the old free VMs stay free while their replacements boot.
    assert await w2.counts("p") == {"ready": 2, "provisioning": 2, "leased": 1}
    await w2.settle()
    assert await w2.counts("p") == {"ready": 2, "leased": 1}
    free = await db.fetch("SELECT name, spec_hash FROM instances WHERE state = 'ready'")
    assert {r["spec_hash"] for r in free} == {new_hash}
    assert old_free.isdisjoint({r["name"] for r in free})
    assert old_free.isdisjoint(await w2.vms())
    # The old leased VM is not reused: its Return destroys it, as always.
    await w2.leaser.return_(lease.instance, "t")
    await w2.settle()
    assert lease.instance not in await w2.vms()
    assert await w2.counts("p") == {"ready": 2}


async def test_the_database_refuses_rows_beyond_max_size(db: Database) -> None:
    # Two leaders that overlap both decide to fill the same pool: the insert
    # counts the pool's rows in the same statement, under a per-pool lock.
    w = await make_world(db, {"pools": [{"name": "p", "min_ready": 3, "max_size": 3}]})
    now = w.clock()
    names = [[f"vmp-test-{i}{j}" for j in range(3)] for i in range(4)]
    written = await asyncio.gather(
        *(w.inventory.add_instances("p", n, now, "h", max_size=3) for n in names)
    )
    assert sum(len(x) for x in written) == 3
    assert await w.counts("p") == {"provisioning": 3}


async def test_an_insert_that_waited_for_the_pool_lock_counts_what_was_committed_meanwhile(
    db: Database, db_url: str
) -> None:
    # Adding instances is one statement (migration 0072): it takes the pool
    # row's lock and only then counts, so rows committed by the insert it
    # waited for (another leader's, overlapping) are counted against max_size.
    w = await make_world(db, {"pools": [{"name": "p", "min_ready": 0, "max_size": 3}]})
    now = w.clock()
    other = await asyncpg.connect(db_url)
    try:
        async with other.transaction():
            assert await other.fetchval("SELECT vmpool_pool_room('p', 3)") == 3
            await other.execute(
                "INSERT INTO instances (name, pool, state, created_at, state_changed_at)"
                " SELECT n, 'p', 'provisioning', now(), now()"
                " FROM unnest(ARRAY['vmp-other-1', 'vmp-other-2']) AS n"
            )
            adding = asyncio.create_task(
                w.inventory.add_instances("p", ["vmp-ours-1", "vmp-ours-2"], now, "h", 3)
            )
            await eventually(
                lambda: db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                ),
                lambda n: n >= 1,
                30,
                "the insert to wait for the pool row's lock",
            )
            assert not adding.done()
        assert await adding == ["vmp-ours-1"]
    finally:
        await other.close()
    assert await w.counts("p") == {"provisioning": 3}


async def test_lease_history_is_kept_for_the_retention_then_deleted_in_batches(
    db: Database,
) -> None:
    w = await make_world(
        db, {"reconciler": {"lease_history_retention": "30d"}, "pools": [{"name": "p"}]}
    )
    now = w.clock()
    await db.execute(
        """INSERT INTO lease_history (instance, pool, service_tag, leased_at, expires_at,
                                      ended_at, end_reason)
           SELECT 'vmp-old-' || i, 'p', 't', $1::timestamptz, $1::timestamptz,
                  $1::timestamptz + i * interval '1 ms', 'expired'
           FROM generate_series(1, 2500) i""",
        now - timedelta(days=31),
    )
    await db.execute(
        """INSERT INTO lease_history (instance, pool, service_tag, leased_at, expires_at,
                                      ended_at, end_reason)
           VALUES ('vmp-recent', 'p', 't', $1, $1, $1, 'returned')""",
        now - timedelta(days=29),
    )
    await w.full_pass()
    await w.reconciler.drain_calls()
    left = await db.fetch("SELECT instance FROM lease_history")
    assert [r["instance"] for r in left] == ["vmp-recent"]


async def test_provider_usable_is_false_only_while_the_provider_fails(db: Database) -> None:
    w = await make_world(db, {"pools": [{"name": "p", "min_ready": 1, "max_size": 1}]})
    await w.settle()
    assert w.reconciler.provider_usable
    real = w.provider.observe

    async def down(*, full: bool = False) -> None:
        raise ProviderError("the VM API is down")

    w.provider.observe = down  # type: ignore[method-assign]
    w.reconciler.resync_soon()
    with pytest.raises(ProviderError):
        await w.full_pass()
    assert not w.reconciler.provider_usable  # health vmpool.provider: NOT_SERVING
    w.provider.observe = real  # type: ignore[method-assign]
    w.reconciler.resync_soon()
    await w.settle()
    assert w.reconciler.provider_usable


async def test_a_leader_that_stops_being_trusted_mid_pass_makes_no_provider_call(
    db: Database,
) -> None:
    """A leader frozen (SIGSTOP) between deciding and calling the provider finds,
    on waking, that its term may be another's: it must not create the VMs it
    decided on (the new leader does), or both would."""
    world = await make_world(db, {"pools": [{"name": "p", "min_ready": 2, "max_size": 4}]})
    answers = iter([True])  # leading when the pass starts, no longer when its calls run

    def is_leader() -> bool:
        return next(answers, False)

    stop = asyncio.Event()
    task = asyncio.create_task(world.reconciler.run(stop, is_leader))
    await eventually(
        lambda: world.counts("p"),
        lambda c: c.get("provisioning", 0) == 2,
        30,
        "the pass's rows",
    )
    stop.set()
    await task
    assert await world.vms() == set()
    # The rows stay for the next leader, which creates their VMs.
    stop = asyncio.Event()
    task = asyncio.create_task(world.reconciler.run(stop, lambda: True))
    try:
        await eventually(world.vms, lambda vms: len(vms) == 2, 10, "the next leader's creates")
    finally:
        stop.set()
        await task


async def _queue_place(w: World, rid: uuid.UUID) -> str:
    """A retried Lease with this reservation (a renewal): its place in the queue."""
    with pytest.raises(leasing.Exhausted) as err:
        await w.leaser.lease("q", None, "t", rid)
    return str(err.value).split(" is queued at ")[1]


async def test_a_new_leader_keeps_the_queue_for_one_reservation_ttl(db: Database) -> None:
    """After an outage longer than reservation_ttl nobody could renew: the new
    leader's first pass must not drop the queue, whoever retries first; entries
    not renewed within one ttl of the takeover expire as usual, and a renewed
    one keeps its place."""
    cfg = {"pools": [{"name": "q", "min_ready": 1, "max_size": 1, "reservation_ttl": "1m"}]}
    old = await make_world(db, cfg)
    await old.settle()
    await old.leaser.lease("q", None, "t", None)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for rid in (first, second, third):
        await _queue_place(old, rid)
    old.clock.advance(minutes=5)  # the leader (and the server) are down

    new = await make_world(db, cfg, clock=old.clock)  # a new leader, same database
    await new.full_pass()
    assert await db.fetchval("SELECT count(*) FROM reservations") == 3
    new.clock.advance(seconds=30)
    assert await _queue_place(new, third) == 'position 3 of 3 in pool "q"'
    await new.full_pass()
    assert await db.fetchval("SELECT count(*) FROM reservations") == 3

    new.clock.advance(seconds=31)  # the grace is over: the unrenewed ones go
    await new.full_pass()
    left = await db.fetch("SELECT id FROM reservations")
    assert [r["id"] for r in left] == [third]
    assert await _queue_place(new, third) == 'position 1 of 1 in pool "q"'
