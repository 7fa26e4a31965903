"""`vmpool serve --role reconciler`: the background work alone, no gRPC port.

It talks to the API processes only through PostgreSQL: their NOTIFYs
(``vmpool_wake``: a lease ended, a reservation queued) wake its reconciler,
and its set-asides NOTIFY ``vmpool_assigned`` for their waiting Leases. Every
process of a deployment can run this role; one leads at a time (vmpool.store.
control), the others stand by. Metrics (with ``vmpool_reconciler_leader``) are
served on ``metrics_listen`` as usual; that port is also its liveness signal.
No readiness probe asks this process about its database, so it checks on a
connection of its own every few seconds (vmpool_database_up and
vmpool_database_read_only mean here what they mean for an API process).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from vmpool.config.schema import Config
from vmpool.control.background import Background, FatalError, StartupError
from vmpool.ops.metrics import Metrics
from vmpool.process.database import open_database
from vmpool.process.ports import start_metrics
from vmpool.process.signals import stop_on_signals
from vmpool.services.dbhealth import DatabaseHealth
from vmpool.store.connect import ConnectSettings
from vmpool.store.inventory import Inventory
from vmpool.store.probe import ProbeConnection

log = structlog.get_logger("vmpool")


async def serve_reconciler(
    config: Config, url: str, on_forced_exit: Callable[[], None] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    stop = stop_on_signals(loop, on_forced_exit)
    metrics = Metrics()
    metrics.set_pool_sizes((p.name, p.min_ready, p.max_size) for p in config.pools)
    db = await open_database(config, url, min_size=1, max_size=1)
    try:
        await Inventory(db).sync_pools([(p.name, p.labels) for p in config.pools])
    finally:
        await db.close()

    fatal_reasons: list[str] = []

    def fatal(reason: str) -> None:  # from the background thread
        fatal_reasons.append(reason)
        loop.call_soon_threadsafe(stop.set)

    background = Background(config, url, metrics, on_assigned=lambda _rid: None, on_fatal=fatal)
    await background.start()
    try:
        start_metrics(config, metrics)
    except StartupError:
        await background.stop()
        raise
    log.info(
        "reconciling",
        role="reconciler",
        pools=[p.name for p in config.pools],
        provider=config.provider.kind,
        metrics=config.metrics_listen or None,
    )
    probe = ProbeConnection(
        url,
        ConnectSettings.from_config(config.database),
        on_dropped=metrics.connection_dropped("probe"),
    )
    health = DatabaseHealth(probe, metrics)
    checks = asyncio.create_task(health.watch(stop), name="db-health")
    try:
        await stop.wait()
    finally:
        checks.cancel()  # at most one ping in flight: nothing to finish
        await asyncio.wait([checks])
        await health.close()  # the ping itself runs in a task of its own
        await probe.close()
    await background.stop()
    if fatal_reasons:  # not asked to stop: exit non-zero
        log.error("stopped after a fatal error", reason=fatal_reasons[0])
        raise FatalError(fatal_reasons[0])
    log.info("stopped")
