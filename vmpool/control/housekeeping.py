"""Retention, run by the leader's reconciler at most every PRUNE_EVERY seconds:
lease_history (reservation look-ups read it) and lease_events (WatchLeases),
in short batches so no delete holds locks for long."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog

from vmpool.config.schema import Config
from vmpool.core.backoff import Monotonic
from vmpool.ops.metrics import Metrics
from vmpool.store.inventory import Inventory

log = structlog.get_logger("vmpool.reconciler")

PRUNE_EVERY = 60.0  # seconds between lease_history retention runs
PRUNE_BATCH = 1000  # rows per delete: short transactions, no long locks
PRUNE_BATCHES = 20  # per run at most; the next run goes on
# Lease events come at the rate of leases (thousands a second under load).
EVENT_PRUNE_BATCH = 5000
EVENT_PRUNE_BATCHES = 100


class Housekeeping:
    def __init__(
        self, inventory: Inventory, config: Config, metrics: Metrics, monotonic: Monotonic
    ) -> None:
        self._inv = inventory
        self._config = config
        self._metrics = metrics
        self._mono = monotonic
        self._last_prune = -1e18

    async def maybe_prune(self, now: datetime) -> None:
        """Prune if PRUNE_EVERY has passed since the last run."""
        if self._mono() - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = self._mono()
        await self._prune_history(now)

    async def _prune_history(self, now: datetime) -> None:
        """lease_history retention, in batches (RESERVATION_LOOKUP reads it)."""
        before = now - self._config.reconciler.lease_history_retention
        total = await _in_batches(
            lambda n: self._inv.prune_history(before, n), PRUNE_BATCH, PRUNE_BATCHES
        )
        if total:
            self._metrics.reconcile_actions.labels("history pruned").inc(total)
            log.info("history pruned", rows=total, ended_before=before.isoformat())
        await self._prune_events()

    async def _prune_events(self) -> None:
        """lease_events retention (WatchLeases), by the database's clock."""
        keep = self._config.reconciler.lease_events_retention
        total = await _in_batches(
            lambda n: self._inv.prune_events(keep, n), EVENT_PRUNE_BATCH, EVENT_PRUNE_BATCHES
        )
        if total:
            self._metrics.reconcile_actions.labels("events pruned").inc(total)
            log.info("lease events pruned", rows=total, older_than=str(keep))


async def _in_batches(delete: Callable[[int], Awaitable[int]], batch: int, batches: int) -> int:
    """Delete ``batch`` rows at a time until fewer are left, at most ``batches``
    times (the next run goes on); how many in all."""
    total = 0
    for _ in range(batches):
        n = await delete(batch)
        total += n
        if n < batch:
            break
    return total
