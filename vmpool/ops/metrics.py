"""Prometheus metrics. One registry per process, passed to whoever records."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from vmpool.core.version import package_version

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SLOW = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)


OWNER_LABELS = 50  # distinct owners a process labels; later ones are counted as "other"


class BoundedLabels:
    """Label values from clients (owners) kept to a bounded set: the first
    ``limit`` seen, then "other" (a flood of made-up tags cannot grow the registry)."""

    def __init__(self, limit: int = OWNER_LABELS) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return "other"
        self._seen.add(value)
        return value


class Children:
    """A labelled metric's children, each looked up once: prometheus-client's
    labels() validates the values and takes a lock on every call, and some are
    made on every RPC. Only for metrics whose children are never removed."""

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.instances = Gauge(
            "vmpool_instances", "Instances by pool and state.", ["pool", "state"], registry=r
        )
        self.pools = Gauge(
            "vmpool_pools",
            "Pools (config and API) by current status (pool-api.md section 3).",
            ["status"],
            registry=r,
        )
        self.pools_reconciling = Gauge(
            "vmpool_pools_reconciling",
            "Pools not yet what their spec and desired status say.",
            registry=r,
        )
        self.reservations_queued = Gauge(
            "vmpool_reservations_queued", "Queued reservations by pool.", ["pool"], registry=r
        )
        self.reservation_oldest_age = Gauge(
            "vmpool_reservation_oldest_age_seconds",
            "Age of the oldest queued reservation by pool.",
            ["pool"],
            registry=r,
        )
        self.rpc_requests = Counter(
            "vmpool_rpc_requests_total",
            "RPCs by method and status.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "vmpool_rpc_duration_seconds",
            "RPC latency by method.",
            ["method"],
            buckets=_FAST,
            registry=r,
        )
        self.leases_granted = Counter(
            "vmpool_leases_granted_total", "Leases granted by pool.", ["pool"], registry=r
        )
        self.lease_duration = Histogram(
            "vmpool_lease_duration_seconds",
            "How long ended leases lasted, by pool and why they ended.",
            ["pool", "reason"],
            buckets=_SLOW,
            registry=r,
        )
        self.reservation_wait = Histogram(
            "vmpool_reservation_wait_seconds",
            "From enqueue to lease for reservations served from the queue.",
            ["pool"],
            buckets=sorted({*_FAST, *_SLOW}),
            registry=r,
        )
        self.boot_duration = Histogram(
            "vmpool_boot_duration_seconds",
            "From create to ready, by pool.",
            ["pool"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200),
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "vmpool_reconcile_duration_seconds",
            "Reconciler pass duration.",
            buckets=_FAST,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "vmpool_reconcile_errors_total",
            "Reconciler pass failures by step.",
            ["step"],
            registry=r,
        )
        self.reconcile_actions = Counter(
            "vmpool_reconcile_actions_total",
            "Reconciler actions by kind (create, delete, expire, ...).",
            ["action"],
            registry=r,
        )
        self.provider_errors = Counter(
            "vmpool_provider_errors_total",
            "Provider API errors by operation and kind.",
            ["operation", "kind"],
            registry=r,
        )
        self.owner_label = BoundedLabels()
        self.owner_leases = Counter(
            "vmpool_owner_leases_total",
            "Leases granted by owner (the first 50 owners seen; the rest as other).",
            ["owner"],
            registry=r,
        )
        self.owner_reservations = Counter(
            "vmpool_owner_reservations_total",
            "Reservations queued by owner (bounded as vmpool_owner_leases_total).",
            ["owner"],
            registry=r,
        )
        self.owner_refusals = Counter(
            "vmpool_owner_refusals_total",
            "Calls refused by owner and reason (queued_quota, lease_quota, "
            "permission_denied, unauthenticated).",
            ["owner", "reason"],
            registry=r,
        )
        self.abandoned_claims = Counter(
            "vmpool_abandoned_claims_total",
            "Claims whose caller was gone (deadline, disconnect) when they committed; "
            "the instance went back to the pool, free.",
            ["pool"],
            registry=r,
        )
        self.leader = Gauge(
            "vmpool_reconciler_leader", "1 while this process runs the background work.", registry=r
        )
        self._operator_metrics(r)
        self._database_metrics(r)
        # Children made on every call, looked up once each.
        self.rpc_requests_by = Children(self.rpc_requests)
        self.leases_granted_by = Children(self.leases_granted)
        self.owner_leases_by = Children(self.owner_leases)
        self.lease_duration_by = Children(self.lease_duration)

    def _operator_metrics(self, r: CollectorRegistry) -> None:
        """What dashboards and alerts need beside the service's own counters."""
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes...
        PlatformCollector(registry=r)  # python_info
        self.build_info = Gauge(
            "vmpool_build_info",
            "Always 1; the labels say which vmpool and Python this process runs.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(package_version(), platform.python_version()).set(1)
        self.pool_min_ready = Gauge(
            "vmpool_pool_min_ready", "Configured min_ready by pool.", ["pool"], registry=r
        )
        self.pool_max_size = Gauge(
            "vmpool_pool_max_size", "Configured max_size by pool.", ["pool"], registry=r
        )
        # Lease calls with x-vmpool-wait spend most of their time queued on
        # purpose: that part is measured here and left out of rpc_duration.
        self.lease_wait = Histogram(
            "vmpool_lease_wait_seconds",
            "Time Lease calls spent waiting server-side for an instance (x-vmpool-wait); "
            "not part of vmpool_rpc_duration_seconds.",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60),
            registry=r,
        )

        self.watch_streams = Gauge(
            "vmpool_watch_streams",
            "WatchLeases streams open in this process (limits.max_watch_streams).",
            registry=r,
        )
        self.watch_refused = Counter(
            "vmpool_watch_refused_total",
            "WatchLeases streams refused or ended by the server, by status "
            "(RESOURCE_EXHAUSTED: a cap or a slow reader; UNAVAILABLE: shutdown).",
            ["code"],
            registry=r,
        )

        # Adaptive warm pools (issue 24), exported by the leader.
        self.desired_ready = Gauge(
            "vmpool_desired_ready",
            "Autoscaled pools: the desired buffer S (ready + booting) the leader sizes for.",
            ["pool"],
            registry=r,
        )
        self.arrival_rate = Gauge(
            "vmpool_arrival_rate",
            "Autoscaled pools: Lease attempts per second, as estimated for sizing.",
            ["pool"],
            registry=r,
        )
        self.boot_time = Gauge(
            "vmpool_boot_time_seconds",
            "Autoscaled pools: learned boot time (create to ready), mean and p95.",
            ["pool", "quantile"],
            registry=r,
        )

    def export_autoscale(
        self, pool: str, desired: int, rate: float, boot_mean: float, boot_p95: float
    ) -> None:
        self.desired_ready.labels(pool).set(desired)
        self.arrival_rate.labels(pool).set(rate)
        self.boot_time.labels(pool, "mean").set(boot_mean)
        self.boot_time.labels(pool, "0.95").set(boot_p95)

    def clear_autoscale(self) -> None:
        self.desired_ready.clear()
        self.arrival_rate.clear()
        self.boot_time.clear()

    def _database_metrics(self, r: CollectorRegistry) -> None:
        """PostgreSQL as this process sees it: reachable, writable, failed over
        (docs/operations.md, "What a failover costs")."""
        self.database_up = Gauge(
            "vmpool_database_up",
            "1 when the database answered this process's last readiness check "
            "(--role reconciler: its own check, every 5 s).",
            registry=r,
        )
        self.database_read_only = Gauge(
            "vmpool_database_read_only",
            "1 when the server that answered the last readiness check refuses writes "
            "(a standby in recovery, default_transaction_read_only).",
            registry=r,
        )
        self.database_read_only_sessions = Counter(
            "vmpool_database_read_only_sessions_total",
            "Sessions found read-only (SQLSTATE 25006, no host matching "
            "target_session_attrs) and dropped, by connection.",
            ["connection"],
            registry=r,
        )
        self.database_reconnects = Counter(
            "vmpool_database_reconnects_total",
            "Connections dropped after an error (lost, timed out, read-only) and made "
            "anew, by connection (pool, control, probe).",
            ["connection"],
            registry=r,
        )
        self.database_timeline = Gauge(
            "vmpool_database_timeline",
            "The primary's timeline ID as last seen; it increases at every promotion.",
            registry=r,
        )
        self.database_timeline_changes = Counter(
            "vmpool_database_timeline_changes_total",
            "Timeline changes seen (a standby was promoted: a failover happened).",
            registry=r,
        )
        self.database_synchronous_standby = Gauge(
            "vmpool_database_synchronous_standby",
            "1 when the primary commits synchronously to a standby "
            "(synchronous_standby_names set, synchronous_commit on), as last checked.",
            registry=r,
        )

    def connection_dropped(self, connection: str) -> Callable[[bool], None]:
        """What a connection (pool, control, probe) calls when it drops a session:
        ``read_only`` when the session refused writes."""

        def dropped(read_only: bool) -> None:
            self.database_reconnects.labels(connection).inc()
            if read_only:
                self.database_read_only_sessions.labels(connection).inc()

        return dropped

    def set_pool_sizes(self, pools: Iterable[tuple[str, int, int]]) -> None:
        """(name, min_ready, max_size) of every pool this process serves."""
        self.pool_min_ready.clear()
        self.pool_max_size.clear()
        for name, min_ready, max_size in pools:
            self.pool_min_ready.labels(name).set(min_ready)
            self.pool_max_size.labels(name).set(max_size)

    def clear_pool_gauges(self) -> None:
        """Forget per-pool gauges (only the leader exports them)."""
        self.instances.clear()
        self.pools.clear()
        self.pools_reconciling.set(0)
        self.reservations_queued.clear()
        self.reservation_oldest_age.clear()
