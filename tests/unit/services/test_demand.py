"""Lease attempts counted per replica and flushed (issue 24): one batched write
per flush, nothing when nothing was counted, nothing lost while the database
is away."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from vmpool.services.demand import DemandCounter, flush_demand
from vmpool.store.errors import StoreUnavailable


class Store:
    def __init__(self) -> None:
        self.writes: list[list[tuple[str, int, int]]] = []
        self.failing = False

    async def add_arrivals(self, rows: list[tuple[str, int, int]]) -> None:
        if self.failing:
            raise StoreUnavailable("database away")
        self.writes.append(sorted(rows))


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def flush_once(counter: DemandCounter, store: Store, clock: Clock, woken: list[str]) -> None:
    stop = asyncio.Event()
    stop.set()  # one flush, then return
    fake: Any = store
    await flush_demand(counter, fake, clock, stop, woken.append)


@pytest.mark.asyncio
async def test_counts_are_written_once_per_pool_and_second_and_the_leader_woken() -> None:
    counter, store, clock = DemandCounter(), Store(), Clock()
    woken: list[str] = []
    for pool in ("a", "a", "b", "a"):
        counter.add(pool)
    await flush_once(counter, store, clock, woken)
    second = int(clock.now.timestamp())
    assert store.writes == [[("a", second, 3), ("b", second, 1)]]
    assert sorted(woken) == ["a", "b"]
    await flush_once(counter, store, clock, woken)
    assert len(store.writes) == 1  # nothing counted: no statement


@pytest.mark.asyncio
async def test_counts_wait_for_the_database_and_are_not_lost() -> None:
    counter, clock = DemandCounter(), Clock()
    woken: list[str] = []
    stop = asyncio.Event()

    class Flaky(Store):
        """Away for the first flush; back for the second, after which we stop."""

        async def add_arrivals(self, rows: list[tuple[str, int, int]]) -> None:
            self.failing = not self.writes and not getattr(self, "failed", False)
            if self.failing:
                self.failed = True
                counter.add("a")  # counted meanwhile
            else:
                stop.set()
            await super().add_arrivals(rows)

    store = Flaky()
    counter.add("a")
    fake: Any = store
    await flush_demand(counter, fake, clock, stop, woken.append)
    second = int(clock.now.timestamp())
    assert store.writes == [[("a", second, 2)]]  # the held count and the new one
    assert woken == ["a"]
