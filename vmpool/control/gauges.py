"""The pool gauges the leader exports after reading a summary: instances by
state, queue, sizing, and pools by status."""

from __future__ import annotations

from dataclasses import replace

from vmpool.core.clock import Clock
from vmpool.domain import pools as pool_rules
from vmpool.domain.autoscale import least_ready
from vmpool.ops.metrics import Metrics
from vmpool.services.catalog import PoolCatalog
from vmpool.store.inventory import INSTANCE_STATES, PoolSummary, Summary


def counts_of(pool: PoolSummary) -> pool_rules.Counts:
    return pool_rules.Counts(**{s: pool.counts.get(s, 0) for s in INSTANCE_STATES})


class PoolGauges:
    def __init__(self, metrics: Metrics, pools: PoolCatalog, clock: Clock) -> None:
        self._metrics = metrics
        self._pools = pools
        self._clock = clock
        self._exported: dict[str, tuple[float, ...]] = {}  # pool -> gauge values last set

    def clear(self) -> None:
        """No longer leader: the new leader exports them."""
        self._metrics.clear_pool_gauges()
        self._exported.clear()

    def export(self, summary: Summary) -> None:
        now = self._clock()
        for name, pool in summary.pools.items():
            age = (now - pool.oldest_enqueued).total_seconds() if pool.oldest_enqueued else 0.0
            cfg = self._pools.pool(name)  # config and API pools alike
            sizing = (cfg.min_ready, cfg.max_size) if cfg is not None else (-1, -1)
            values = (*(pool.counts.get(s, 0) for s in INSTANCE_STATES), pool.queued, age, *sizing)
            if self._exported.get(name) == values:
                continue  # unchanged: with many pools, setting gauges is most of a pass
            self._exported[name] = values
            for state in INSTANCE_STATES:
                self._metrics.instances.labels(name, state).set(pool.counts.get(state, 0))
            self._metrics.reservations_queued.labels(name).set(pool.queued)
            self._metrics.reservation_oldest_age.labels(name).set(max(age, 0.0))
            if cfg is not None:
                self._metrics.pool_min_ready.labels(name).set(sizing[0])
                self._metrics.pool_max_size.labels(name).set(sizing[1])

    def export_statuses(self, summary: Summary) -> None:
        """vmpool_pools{status} and vmpool_pools_reconciling, from a full summary."""
        by_status = dict.fromkeys(pool_rules.CURRENT_STATUSES, 0)
        reconciling = 0
        for name, pool in summary.pools.items():
            cfg = self._pools.pool(name)
            if cfg is None and pool.desired_status == pool_rules.RUNNING:
                continue  # removed from the config: not a pool any more
            counts = counts_of(pool)
            if cfg is not None:
                current = self._pools.spec_hash(cfg)
                fresh = sum(pool.by_hash.get((st, current), 0) for st in ("ready", "provisioning"))
                counts = replace(counts, stale_free=counts.ready + counts.provisioning - fresh)
            status = pool_rules.pool_status(
                pool.desired_status,
                counts,
                min_ready=least_ready(cfg) if cfg is not None else 0,
                max_size=cfg.max_size if cfg is not None else 0,
                reached_running=pool.reached_running,
            )
            by_status[status.current] += 1
            reconciling += status.reconciling
        for status_name, n in by_status.items():
            self._metrics.pools.labels(status_name).set(n)
        self._metrics.pools_reconciling.set(reconciling)
