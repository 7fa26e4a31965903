"""Lease attempts per autoscaled pool, counted where the calls arrive (issue 24).

The Leaser calls ``add(pool)`` for every Lease attempt on a pool with an
``autoscale:`` block (served, queued or refused): a dict increment, no I/O.
``flush_demand`` writes what was counted every FLUSH_EVERY, one batched
statement and only when something was counted, so the leader sees every replica's
demand (vmpool.control.autoscaler reads it back)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from vmpool.core.clock import Clock
from vmpool.core.echo import echo
from vmpool.store.autoscale import AutoscaleStore
from vmpool.store.errors import StoreError

log = structlog.get_logger("vmpool.autoscale")

FLUSH_EVERY = 0.25  # seconds: a boot may take only seconds; the leader should know soon
MAX_HELD = 3600  # seconds of counts kept while the database is away


class DemandCounter:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, pool: str) -> None:
        self._counts[pool] = self._counts.get(pool, 0) + 1

    def take(self) -> dict[str, int]:
        counts, self._counts = self._counts, {}
        return counts


async def flush_demand(
    counter: DemandCounter,
    store: AutoscaleStore,
    clock: Clock,
    stop: asyncio.Event,
    on_flushed: Callable[[str], None] = lambda _pool: None,
) -> None:
    """Until ``stop``, then once more. ``on_flushed(pool)``: demand of ``pool``
    is in the database (the reconciler is woken to read it)."""
    held: list[tuple[str, int, int]] = []  # not written yet (database away)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FLUSH_EVERY)
        second = int(clock().timestamp())
        held += [(pool, second, n) for pool, n in counter.take().items()]
        if held:
            try:
                await store.add_arrivals(_merged(held))
                for pool in {h[0] for h in held}:
                    on_flushed(pool)
                held = []
            except StoreError as err:
                held = [h for h in held if h[1] > second - MAX_HELD]
                log.warning("demand not recorded yet", error=echo(str(err), 200), held=len(held))
        if stop.is_set():
            return


def _merged(rows: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """One row per (pool, second): the statement upserts each key once."""
    out: dict[tuple[str, int], int] = {}
    for pool, second, n in rows:
        out[(pool, second)] = out.get((pool, second), 0) + n
    return [(p, s, n) for (p, s), n in out.items()]
