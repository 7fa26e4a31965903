"""Shared builders for integration tests: a movable clock and a wired-up service."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from vmpool.config.loading import parse_config
from vmpool.config.schema import Config
from vmpool.control.doorbell import Inbox
from vmpool.control.reconciler import Reconciler
from vmpool.ops.metrics import Metrics
from vmpool.providers.fake import FakeProvider
from vmpool.services.demand import DemandCounter
from vmpool.services.leaser import Leaser
from vmpool.services.waiters import Waiters
from vmpool.store.autoscale import AutoscaleStore
from vmpool.store.db import Database
from vmpool.store.fakecloud import FakeCloud
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore


class Clock:
    """Wall and monotonic time that move only when the test says so."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, tzinfo=UTC)
        self.mono = 1000.0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, **kw: float) -> None:
        step = timedelta(**kw)
        self.now += step
        self.mono += step.total_seconds()


@dataclass
class World:
    config: Config
    clock: Clock
    db: Database
    store: LeaseStore
    inventory: Inventory
    provider: FakeProvider
    reconciler: Reconciler
    leaser: Leaser
    waiters: Waiters
    metrics: Metrics
    inbox: Inbox  # what the serving thread tells the reconciler
    demand: DemandCounter | None = None  # with autoscale: Lease attempts counted

    async def full_pass(self) -> bool:
        self.reconciler.wake()  # over every pool, as the periodic pass is
        return await self.reconciler.pass_once()

    async def settle_once(self) -> None:
        """One full pass and its provider calls."""
        await self.full_pass()
        await self.reconciler.drain_calls()

    async def settle(self, passes: int = 20) -> None:
        """Run full reconcile passes until nothing changes."""
        for _ in range(passes):
            if not await self.full_pass():
                await self.reconciler.drain_calls()
                if not await self.full_pass():
                    return
            await self.reconciler.drain_calls()
        raise AssertionError("reconciler did not settle")

    async def counts(self, pool: str) -> dict[str, int]:
        rows = await self.db.fetch(
            "SELECT state, count(*) AS n FROM instances WHERE pool = $1 GROUP BY state", pool
        )
        return {r["state"]: int(r["n"]) for r in rows}

    async def vms(self) -> set[str]:
        return {r["name"] for r in await self.db.fetch("SELECT name FROM fake_vms")}

    async def rows(self) -> set[str]:
        return {r["name"] for r in await self.db.fetch("SELECT name FROM instances")}


async def make_world(
    db: Database, config: dict[str, Any], *, autoscale: bool = False, clock: Clock | None = None
) -> World:
    """``autoscale``: wired as vmpool serve is (demand counted, state stored)."""
    cfg = parse_config({"provider": {"kind": "fake", "fake": {"boot_seconds": 0}}, **config})
    clock = clock or Clock()
    metrics = Metrics()
    waiters = Waiters()
    inventory = Inventory(db)
    await inventory.sync_pools([(p.name, p.labels) for p in cfg.pools])
    store = LeaseStore(db, on_abandoned=lambda pool: metrics.abandoned_claims.labels(pool).inc())
    provider = FakeProvider(
        FakeCloud(db), cfg.provider.fake, clock=clock, orphan_grace=timedelta(minutes=10)
    )
    inbox = Inbox()
    reconciler = Reconciler(
        inventory,
        provider,
        cfg,
        clock,
        metrics,
        waiters.wake,
        inbox=inbox,
        monotonic=clock.monotonic,
        autoscale_store=AutoscaleStore(db, fenced=inventory.fenced) if autoscale else None,
    )
    demand = DemandCounter() if autoscale else None
    leaser = Leaser(store, cfg, clock, waiters, metrics, demand=demand)
    return World(
        cfg,
        clock,
        db,
        store,
        inventory,
        provider,
        reconciler,
        leaser,
        waiters,
        metrics,
        inbox,
        demand,
    )
