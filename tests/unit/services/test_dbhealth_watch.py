"""DatabaseHealth.watch: what keeps vmpool_database_up / vmpool_database_read_only
current in a process that no readiness probe asks (``--role reconciler``)."""

from __future__ import annotations

import asyncio

from vmpool.ops.metrics import Metrics
from vmpool.services.dbhealth import DatabaseHealth
from vmpool.store.errors import StoreReadOnly, StoreUnavailable


def gauges(metrics: Metrics) -> tuple[float | None, float | None]:
    r = metrics.registry
    return r.get_sample_value("vmpool_database_up"), r.get_sample_value("vmpool_database_read_only")


class Server:
    """Answers read-only, then not at all, then writable; stops the watch at the end."""

    def __init__(self, metrics: Metrics, stop: asyncio.Event) -> None:
        self.outcomes: list[BaseException | None] = [
            StoreReadOnly("a standby"),
            StoreUnavailable("gone"),
            RuntimeError("a bug in a check"),
            None,
        ]
        self.seen: list[tuple[float | None, float | None]] = []
        self._metrics = metrics
        self._stop = stop

    async def ping(self, timeout: float) -> None:
        self.seen.append(gauges(self._metrics))  # what the previous check left
        outcome = self.outcomes.pop(0)
        if not self.outcomes:
            self._stop.set()
        if outcome is not None:
            raise outcome


async def test_every_check_sets_the_gauges_and_no_failure_ends_the_watch() -> None:
    metrics = Metrics()
    stop = asyncio.Event()
    server = Server(metrics, stop)
    await asyncio.wait_for(DatabaseHealth(server, metrics).watch(stop, every=0), 10)
    assert server.seen == [
        (0.0, 0.0),  # nothing checked yet
        (1.0, 1.0),  # answered, refuses writes
        (0.0, 0.0),  # did not answer
        (0.0, 0.0),  # the check itself failed: not counted as up
    ]
    assert gauges(metrics) == (1.0, 0.0)  # answered, writable


async def test_the_watch_ends_when_asked() -> None:
    metrics = Metrics()
    stop = asyncio.Event()
    stop.set()
    server = Server(metrics, stop)
    await asyncio.wait_for(DatabaseHealth(server, metrics).watch(stop, every=3600), 10)
    assert server.seen == []
