"""The reconciler's decisions, one test per rule of spec sections 5-6 (and the
template rollout of issue 9). Plain function calls: no database, no sleeps.

Read next to /work/shared/spec/lease-api.md: each test is named for its rule.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vmpool.config.loading import parse_config
from vmpool.domain.planner import (
    VM,
    BootFailed,
    Create,
    CreateVM,
    DeleteVM,
    DestroyFree,
    DropQueue,
    ExpireLeases,
    ExpireReservations,
    Forget,
    MarkReady,
    Observed,
    PoolObserved,
    PoolTarget,
    Recycle,
    ReplaceStale,
    Row,
    SetAside,
    Vanished,
    orphans_seen,
    plan_pools,
    plan_rows,
    reservations_held,
    target_from_config,
)
from vmpool.domain.spec_hash import pool_spec_hash, spec_hash

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
MONO = 1000.0
H = "cafe"  # the pool's current spec hash
OLD = "0ld0"


def target(**kw: object) -> PoolTarget:
    fields: dict[str, object] = {
        "name": "p",
        "min_ready": 2,
        "max_size": 10,
        "max_provisioning": 5,
        "spec_hash": H,
    }
    fields.update(kw)
    return PoolTarget(**fields)  # type: ignore[arg-type]


def pool(**kw: object) -> PoolObserved:
    """Observed counts; ``ready``/``provisioning`` are current unless said otherwise."""
    kw.setdefault("ready_current", kw.get("ready", 0))
    kw.setdefault("provisioning_current", kw.get("provisioning", 0))
    return PoolObserved("p", **kw)  # type: ignore[arg-type]


def plan(
    p: PoolObserved,
    t: PoolTarget | None = None,
    *,
    now: datetime = NOW,
    mono: float = MONO,
    **observed: object,
) -> list[object]:
    targets = {} if t is None else {t.name: t}
    return list(plan_pools(Observed({p.name: p}, **observed), targets, now, mono))  # type: ignore[arg-type]


def creates(actions: list[object]) -> int:
    return sum(a.count for a in actions if isinstance(a, Create))


# --- section 6: pool sizing -------------------------------------------------------


@pytest.mark.parametrize(
    ("observed", "made"),
    [
        (pool(), 2),
        (pool(ready=1), 1),
        (pool(ready=1, provisioning=1), 0),
        (pool(ready=2), 0),
        (pool(ready=5), 0),  # more free than min_ready: nothing is destroyed for it
        (pool(leased=4), 2),  # leased instances are not free
    ],
)
def test_keep_min_ready_free_instances(observed: PoolObserved, made: int) -> None:
    assert creates(plan(observed, target())) == made


@pytest.mark.parametrize(
    ("observed", "made"),
    [
        (pool(ready=2, waiting=3), 3),  # one per reservation with nothing set aside
        (pool(ready=2, set_aside=3, reserved=3), 0),  # set aside: already provided for
        (pool(ready=0, waiting=1, provisioning=2), 1),
    ],
)
def test_plus_one_per_queued_reservation_with_nothing_set_aside(
    observed: PoolObserved, made: int
) -> None:
    assert creates(plan(observed, target())) == made


@pytest.mark.parametrize(
    ("observed", "made"),
    [
        (pool(leased=9), 1),
        (pool(leased=10), 0),
        (pool(leased=8, reserved=1, provisioning=1), 0),
        (pool(leased=8, destroying=5), 2),  # destroying does not count
    ],
)
def test_never_more_than_max_size_instances_but_destroying_ones(
    observed: PoolObserved, made: int
) -> None:
    assert creates(plan(observed, target(min_ready=4))) == made


def test_create_carries_max_size_for_the_database_guard() -> None:
    (create,) = [a for a in plan(pool(), target()) if isinstance(a, Create)]
    assert create == Create("p", 2, H, 10)


@pytest.mark.parametrize(("booting", "made"), [(0, 3), (2, 1), (3, 0), (5, 0)])
def test_at_most_max_provisioning_at_once(booting: int, made: int) -> None:
    assert (
        creates(plan(pool(provisioning=booting), target(min_ready=8, max_provisioning=3))) == made
    )


def test_free_instances_go_to_waiting_reservations_first() -> None:
    actions = plan(pool(ready=2, waiting=3), target())
    assert SetAside("p", 3) in actions
    assert actions.index(SetAside("p", 3)) < next(
        i for i, a in enumerate(actions) if isinstance(a, Create)
    )
    assert not any(isinstance(a, SetAside) for a in plan(pool(waiting=3), target()))


# --- section 5: instance lifecycle ------------------------------------------------


def test_provisioning_longer_than_boot_timeout_is_destroyed_and_replaced() -> None:
    t = target(boot_timeout=timedelta(minutes=10))
    old = Row("a", "p", "provisioning", NOW - timedelta(minutes=10))
    young = Row("b", "p", "provisioning", NOW - timedelta(minutes=9))
    vms = {"a": VM("a"), "b": VM("b")}
    assert plan_rows([old, young], vms, {"p": t}, NOW) == [BootFailed("a", "boot_timeout")]


def test_provider_reported_failure_is_destroyed_and_replaced() -> None:
    row = Row("a", "p", "provisioning", NOW)
    actions = plan_rows([row], {"a": VM("a", failed=True, reason="ErrImagePull")}, {}, NOW)
    assert actions == [BootFailed("a", "ErrImagePull")]


def test_repeated_boot_failures_back_off_per_pool() -> None:
    observed = pool()
    during = plan(observed, target(), mono=MONO, pool_backoff_until={"p": MONO + 5})
    after = plan(observed, target(), mono=MONO + 5, pool_backoff_until={"p": MONO + 5})
    assert creates(during) == 0
    assert creates(after) == 2


def test_a_finished_boot_becomes_ready_in_the_pool_zone_or_the_providers() -> None:
    row = Row("a", "p", "provisioning", NOW)
    vms = {"a": VM("a", ready=True, zone="z-provider")}
    assert plan_rows([row], vms, {"p": target()}, NOW) == [MarkReady("a", "z-provider")]
    assert plan_rows([row], vms, {"p": target(zone="z-pool")}, NOW) == [MarkReady("a", "z-pool")]


def test_a_lease_past_its_expiry_ends() -> None:
    assert ExpireLeases() in plan(pool(leased=1), target(), next_lease_expiry=NOW)
    later = NOW + timedelta(microseconds=1)
    assert ExpireLeases() not in plan(pool(leased=1), target(), next_lease_expiry=later)


def test_an_expired_reservation_leaves_the_queue() -> None:
    assert ExpireReservations() in plan(pool(waiting=1, next_reservation_expiry=NOW), target())
    future = pool(waiting=1, next_reservation_expiry=NOW + timedelta(seconds=1))
    assert ExpireReservations() not in plan(future, target())


def test_a_new_leader_holds_each_pools_reservations_for_its_ttl() -> None:
    ttls = {"short": timedelta(minutes=1), "long": timedelta(minutes=5)}
    assert reservations_held(59.0, ttls) == {"short", "long"}
    assert reservations_held(60.0, ttls) == {"long"}
    assert reservations_held(300.0, ttls) == frozenset()
    due = Observed(
        {n: PoolObserved(n, waiting=1, next_reservation_expiry=NOW) for n in ("long", "short")}
    )
    targets = {n: target(name=n) for n in ("long", "short")}
    assert ExpireReservations(("short",)) in plan_pools(
        due, targets, NOW, MONO, held=frozenset({"long"})
    )
    held_all = plan_pools(due, targets, NOW, MONO, held=frozenset({"long", "short"}))
    assert not any(isinstance(a, ExpireReservations) for a in held_all)


def test_a_free_instance_older_than_max_ready_age_is_recycled() -> None:
    t = target(max_ready_age=timedelta(hours=1))
    aged = pool(ready=2, oldest_ready=NOW - timedelta(hours=1))
    fresh = pool(ready=2, oldest_ready=NOW - timedelta(minutes=59))
    assert Recycle("p", NOW - timedelta(hours=1)) in plan(aged, t)
    assert not any(isinstance(a, Recycle) for a in plan(fresh, t))
    assert not any(isinstance(a, Recycle) for a in plan(aged, target()))  # not set: never


def test_a_leased_instance_whose_vm_disappears_ends_its_lease() -> None:
    rows = [Row("a", "p", "leased", NOW), Row("b", "p", "ready", NOW), Row("c", "p", "leased", NOW)]
    assert plan_rows(rows, {"c": VM("c", ready=True)}, {}, NOW) == [Vanished(("a", "b"))]


def test_a_booting_vm_that_disappears_is_vanished_not_waited_for() -> None:
    """Seen, then deleted while booting: the row goes now (a replacement under a new
    name follows), not a re-create of the same name after RECREATE_AFTER."""
    row = Row("a", "p", "provisioning", NOW)
    gone = frozenset({"a"})
    assert plan_rows([row], {}, {"p": target()}, NOW, disappeared=gone) == [Vanished(("a",))]
    # Never seen yet (a create the backend does not show yet): create, as before.
    assert plan_rows([row], {}, {"p": target()}, NOW) == [CreateVM("a", "p")]
    # A create in flight for it is left alone.
    assert plan_rows([row], {}, {"p": target()}, NOW, busy=gone, disappeared=gone) == []


def test_a_vm_is_created_only_after_its_row_exists() -> None:
    # Sizing writes rows (Create); a VM is made for a provisioning row without one.
    assert creates(plan(pool(), target())) == 2
    row = Row("a", "p", "provisioning", NOW)
    assert plan_rows([row], {}, {"p": target()}, NOW) == [CreateVM("a", "p")]
    assert plan_rows([row], {}, {"p": target()}, NOW, busy=frozenset({"a"})) == []


def test_a_row_leaves_destroying_only_after_the_provider_confirms_the_vm_gone() -> None:
    rows = [
        Row("gone", "p", "destroying", NOW),
        Row("there", "p", "destroying", NOW, destroy_reason="returned"),
        Row("going", "p", "destroying", NOW),
    ]
    vms = {"there": VM("there", ready=True), "going": VM("going", deleting=True)}
    assert plan_rows(rows, vms, {}, NOW) == [DeleteVM("there", "returned"), Forget(("gone",))]


def test_vms_with_our_labels_but_no_row_are_deleted_after_the_grace() -> None:
    grace = timedelta(minutes=10)
    vms = {"orphan": VM("orphan", ready=True), "mine": VM("mine", ready=True)}
    rows = [Row("mine", "p", "ready", NOW)]
    seen = orphans_seen(["mine"], vms, {}, NOW)
    assert seen == {"orphan": NOW}
    assert plan_rows(rows, vms, {}, NOW, orphans_since=seen, orphan_grace=grace) == []
    later = NOW + grace
    assert orphans_seen(["mine"], vms, seen, later) == {"orphan": NOW}  # first sighting kept
    assert plan_rows(rows, vms, {}, later, orphans_since=seen, orphan_grace=grace) == [
        DeleteVM("orphan", "orphan")
    ]
    # Without every row, absence of a row proves nothing: no orphan check.
    assert plan_rows(rows, vms, {}, later, orphans_since=None, orphan_grace=grace) == []


# --- section 7: a removed pool drains; the pool API's statuses ----------------------


def test_removing_a_pool_drains_it_leases_run_to_their_end() -> None:
    observed = pool(ready=2, provisioning=1, leased=3, waiting=1)
    actions = plan(observed, None)  # no target: not in the config any more
    assert actions == [DropQueue("p"), DestroyFree("p")]
    assert plan(pool(leased=3), None) == []


@pytest.mark.parametrize(
    ("accepting", "keep_free", "expected"),
    [
        (False, False, [DropQueue("p"), DestroyFree("p")]),  # drained, stopped, deleted
        (False, True, [DropQueue("p")]),  # no new leases, free VMs kept warm
    ],
)
def test_a_pool_not_accepting_leases_drops_its_queue(
    accepting: bool, keep_free: bool, expected: list[object]
) -> None:
    observed = pool(ready=2, waiting=1)
    t = target(accepting_leases=accepting, keep_free=keep_free, min_ready=2)
    assert [a for a in plan(observed, t) if not isinstance(a, Create)] == expected


def test_an_event_driven_pass_plans_only_the_pools_it_looked_at() -> None:
    targets = {"p": target(), "q": target(name="q")}
    actions = plan_pools(Observed({"p": pool()}, complete=False), targets, NOW, MONO)
    assert {a.pool for a in actions if isinstance(a, Create)} == {"p"}
    everything = plan_pools(Observed({"p": pool()}), targets, NOW, MONO)
    assert {a.pool for a in everything if isinstance(a, Create)} == {"p", "q"}


# --- template rollout (issue 9 item 6) --------------------------------------------


def test_rollout_stale_free_instances_are_replaced_new_first() -> None:
    stale = pool(ready=2, ready_current=0)
    first = plan(stale, target())
    assert creates(first) == 2
    assert not any(isinstance(a, ReplaceStale) for a in first)  # nothing is free yet
    replaced = pool(ready=4, ready_current=2)  # the replacements are ready
    assert ReplaceStale("p", H, "ready", 2) in plan(replaced, target())


def test_rollout_keeps_min_ready_and_serves_demand_meanwhile() -> None:
    # 1 current + 2 stale free, min_ready 2: one stale one can go now.
    actions = plan(pool(ready=3, ready_current=1), target())
    assert ReplaceStale("p", H, "ready", 1) in actions
    assert creates(actions) == 1


def test_rollout_a_stale_boot_is_stopped_at_once() -> None:
    actions = plan(pool(provisioning=2, provisioning_current=0), target())
    assert ReplaceStale("p", H, "provisioning", 2) in actions
    assert creates(actions) == 2


def test_rollout_at_max_size_frees_room_one_batch_at_a_time() -> None:
    # Full pool of stale free VMs: the limits do not allow new-first.
    full = pool(ready=4, ready_current=0)
    actions = plan(full, target(min_ready=4, max_size=4, max_provisioning=2))
    assert ReplaceStale("p", H, "ready", 2) in actions
    assert creates(actions) == 2
    # While that batch boots, no more old VMs go.
    booting = pool(ready=2, ready_current=0, provisioning=2)
    later = plan(booting, target(min_ready=4, max_size=4, max_provisioning=2))
    assert not any(isinstance(a, ReplaceStale) for a in later)
    # Nor while a broken template is in backoff.
    blocked = plan(
        full,
        target(min_ready=4, max_size=4, max_provisioning=2),
        pool_backoff_until={"p": MONO + 1},
    )
    assert not any(isinstance(a, ReplaceStale | Create) for a in blocked)


def test_rollout_leased_instances_are_left_to_their_lease() -> None:
    # Leased VMs of an old spec are destroyed when their lease ends (as every
    # leased VM is), never made free again: the planner has nothing to do.
    actions = plan(pool(ready=2, leased=3), target())
    assert actions == []


def test_spec_hash_is_stable_and_changes_with_the_template() -> None:
    assert spec_hash({"a": 1, "b": {"c": [1, 2]}}) == spec_hash({"b": {"c": [1, 2]}, "a": 1})
    assert spec_hash({"a": 1}) != spec_hash({"a": 2})
    a = parse_config({"pools": [{"name": "p", "template": {"spec": {"x": 1}}}]}).pools[0]
    b = parse_config({"pools": [{"name": "p", "template": {"spec": {"x": 2}}, "min_ready": 5}]})
    assert pool_spec_hash(a) != pool_spec_hash(b.pools[0])
    resized = parse_config(
        {"pools": [{"name": "p", "template": {"spec": {"x": 1}}, "max_size": 20}]}
    )
    assert pool_spec_hash(a) == pool_spec_hash(resized.pools[0])  # sizing is not the VM's spec
    assert target_from_config(a).spec_hash == pool_spec_hash(a)
    assert len(pool_spec_hash(a)) == 16
