"""Adaptive warm pools against a real PostgreSQL (issue 24): demand counted by
the Leaser reaches the leader through the database, S sizes the pool, and what
was learned survives a restart (a fresh reconciler on the same database)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from tests.integration.helpers import Clock, World, make_world
from vmpool.api.admin import AdminService
from vmpool.cli.admin import status_table
from vmpool.domain.leasing import Exhausted
from vmpool.proto.vmpool.admin import v1 as adm
from vmpool.services.demand import flush_demand
from vmpool.store.autoscale import AutoscaleStore
from vmpool.store.db import Database

CONFIG: dict[str, Any] = {
    "provider": {"kind": "fake", "fake": {"boot_seconds": 2}},
    "pools": [
        {
            "name": "a",
            "min_ready": 0,
            "max_size": 40,
            "max_provisioning": 40,
            "autoscale": {
                "floor": 1,
                "ceiling": 40,
                "scale_down_delay": "10s",
                "period": "60s",
                "bin": "5s",
                "window": "30s",
            },
        }
    ],
}


async def attempts(w: World, n: int) -> None:
    """``n`` Lease calls (served or refused), then the replica's flush."""
    for _ in range(n):
        with contextlib.suppress(Exhausted):
            await w.leaser.lease("a", None, "t", None)
    assert w.demand is not None
    stop = asyncio.Event()
    stop.set()  # one flush, then return
    await flush_demand(w.demand, AutoscaleStore(w.db), w.clock, stop)
    w.reconciler.wake_pools(["a"])  # the Leaser's on_change


async def pass_at(w: World, second: float) -> None:
    """A pass (and its provider calls) at ``second`` after START."""
    w.clock.advance(seconds=START + second - w.clock.now.timestamp())
    await w.settle_once()


START = Clock().now.timestamp()  # 12:00:00 UTC: a multiple of the 60 s period


def desired(w: World) -> int:
    assert w.reconciler.autoscaler is not None
    return w.reconciler.autoscaler.decisions["a"].s


@pytest.mark.asyncio
async def test_demand_sizes_the_pool_and_a_restart_keeps_what_was_learned(db: Database) -> None:
    w = await make_world(db, CONFIG, autoscale=True)
    await w.settle_once()
    assert desired(w) == 1  # no demand yet: the floor
    for t in (2, 4, 6):
        await pass_at(w, t)  # boots finish: boot time learned
    # A burst of 12 attempts at second 30 of two periods.
    for period in (0, 1):
        base = 60 * period
        await pass_at(w, base + 30)
        await attempts(w, 12)
        await pass_at(w, base + 31)
        assert desired(w) >= 12  # S rose while the burst was arriving
        assert (await w.counts("a")).get("provisioning", 0) >= 10
        for t in range(35, 61, 5):
            await pass_at(w, base + t)
        await pass_at(w, base + 60 + 20)
        assert desired(w) < 12  # after scale_down_delay and its fall
    counts = await w.counts("a")
    assert counts.get("ready", 0) <= desired(w)  # idle VMs above S were destroyed

    # A new leader (fresh reconciler and autoscaler, same database), just
    # before the third burst: it boots for it from the stored profile.
    again = await make_world(db, CONFIG, autoscale=True, clock=w.clock)
    await pass_at(again, 120 + 27.5)
    assert again.reconciler.autoscaler is not None
    decision = again.reconciler.autoscaler.decisions["a"]
    assert decision.reason == "profile", decision
    assert decision.s >= 12
    assert decision.boot_mean < 10  # the 2 s boots (seen at passes 5 s apart), not the 60 s default
    assert (await again.counts("a")).get("provisioning", 0) >= 5
    await again.reconciler.drain_calls()
    await w.reconciler.drain_calls()


@pytest.mark.asyncio
async def test_observe_mode_reports_s_and_keeps_min_ready(db: Database) -> None:
    config = {**CONFIG, "pools": [{**CONFIG["pools"][0], "min_ready": 2}]}
    config["pools"][0]["autoscale"] = {**config["pools"][0]["autoscale"], "mode": "observe"}
    w = await make_world(db, config, autoscale=True)
    await w.settle_once()
    await attempts(w, 12)
    await pass_at(w, 1)
    assert desired(w) >= 12
    counts = await w.counts("a")
    assert counts.get("provisioning", 0) + counts.get("ready", 0) <= 2 + 1
    await w.reconciler.drain_calls()


@pytest.mark.asyncio
async def test_pool_stats_status_and_metrics_show_s_with_its_inputs(db: Database) -> None:
    w = await make_world(db, CONFIG, autoscale=True)
    await w.settle_once()
    for t in (2, 4):
        await pass_at(w, t)
    await attempts(w, 12)
    await pass_at(w, 5)
    await pass_at(w, 11)  # the state (with the decision) is written at most every 5 s
    admin = AdminService(
        w.inventory,
        w.store,
        w.config,
        w.clock,
        w.metrics,
        lambda: None,
        autoscale=AutoscaleStore(db),
    )
    (stats,) = (await admin.pool_stats(adm.PoolStatsRequest())).pools
    a = stats.autoscale
    assert a.mode == "act" and a.reason in ("rate", "holding")  # held after the burst
    assert a.desired_ready == desired(w) >= 12
    assert a.arrivals_per_minute > 0 and 0 < a.rate_term <= a.desired_ready
    assert 1.5 <= a.boot_mean_seconds <= a.boot_p95_seconds < 10
    text = status_table([stats])
    assert "AUTOSCALE" in text and f"a          act   {a.desired_ready}" in text
    assert w.metrics.desired_ready.labels("a")._value.get() == a.desired_ready
    await w.reconciler.drain_calls()


@pytest.mark.asyncio
async def test_an_idle_autoscaled_pool_costs_about_one_statement_in_ten_seconds(
    db: Database,
) -> None:
    w = await make_world(db, CONFIG, autoscale=True)
    assert w.reconciler.autoscaler is not None
    store = w.reconciler.autoscaler._store
    calls: list[str] = []
    for method in ("arrivals_since", "save_states", "prune_arrivals", "load_states"):
        original = getattr(store, method)

        def counted(*a: Any, _m: str = method, _o: Any = original) -> Any:
            calls.append(_m)
            return _o(*a)

        setattr(store, method, counted)
    for t in range(0, 40, 4):  # settle: boots done, S at the floor, state saved
        await pass_at(w, t)
    calls.clear()
    for t in range(40, 100, 2):  # a minute of full passes, no demand
        await pass_at(w, t)
    assert len(calls) <= 7, calls  # a read every 10 s; nothing to save or prune
    await w.reconciler.drain_calls()
