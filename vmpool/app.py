"""The composition root of `vmpool serve`: build every part, run, shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import structlog
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health
from grpclib.server import Server

from vmpool.admin import AdminService
from vmpool.clock import utcnow
from vmpool.codec import SafeProtoCodec
from vmpool.config import Config
from vmpool.dbhealth import DatabaseHealth
from vmpool.leaser import Leaser
from vmpool.metrics import Metrics
from vmpool.providers.base import Provider
from vmpool.providers.errors import ProviderError
from vmpool.reconciler import Reconciler
from vmpool.rpc import Gate, instrument
from vmpool.service import LeaseService
from vmpool.store.control import Control
from vmpool.store.db import Database, create_pool, migrate
from vmpool.store.errors import UNAVAILABLE_ERRORS, StoreUnavailable
from vmpool.store.fakecloud import FakeCloud
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore
from vmpool.waiters import Waiters

log = structlog.get_logger("vmpool")

CONNECT_FOR = 60.0  # seconds to keep trying the database at start


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


def build_provider(config: Config, db: Database, metrics: Metrics) -> Provider:
    if config.provider.kind == "kubevirt":
        from vmpool.providers.kubevirt import build_kubevirt_provider

        return build_kubevirt_provider(config.provider.kubevirt, config.pools, metrics)
    from vmpool.providers.fake import FakeProvider

    return FakeProvider(FakeCloud(db), config.provider.fake)


async def connect(url: str, *, min_size: int = 2, max_size: int = 10) -> Database:
    deadline = time.monotonic() + CONNECT_FOR
    delay = 0.5
    while True:
        try:
            return await create_pool(url, min_size=min_size, max_size=max_size)
        except StoreUnavailable as err:
            if time.monotonic() > deadline:
                raise
            log.warning("database not reachable yet", error=str(err), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_metrics(config: Config, metrics: Metrics) -> None:
    if not config.metrics_listen:
        return
    from prometheus_client import start_http_server

    host, port = _split(config.metrics_listen)
    start_http_server(port, addr=host, registry=metrics.registry)


async def serve(config: Config, url: str, *, listen: str | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting at once")
            os._exit(1)
        log.info("shutting down")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    metrics = Metrics()
    try:
        db = await connect(url)
        # The background work has connections of its own: a storm of RPCs never
        # starves the reconciler of connections, nor the reverse.
        background_db = await connect(url, min_size=1, max_size=4)
    except StoreUnavailable as err:
        raise StartupError(f"database_url: {err}") from None
    try:
        async with db.acquire() as conn:
            await migrate(conn)
        inventory = Inventory(db)
        await inventory.sync_pools([(p.name, p.labels) for p in config.pools])
        leases = LeaseStore(db)
        waiters = Waiters()
        provider = build_provider(config, background_db, metrics)
        reconciler = Reconciler(
            Inventory(background_db), provider, config, utcnow, metrics, waiters
        )
        control = Control(
            url,
            config.reconcile_interval.total_seconds(),
            on_wake=reconciler.wake,
            on_assigned=waiters.wake,
            on_leadership=lambda _leading: reconciler.wake(),
        )
        leaser = Leaser(
            leases,
            config,
            utcnow,
            waiters,
            metrics,
            on_change=reconciler.wake,
            reconciles_here=control.is_leader,
        )
        gate = Gate()
        serving = ServiceStatus()
        lease_service = LeaseService(leaser, config, DatabaseHealth(leases))
        admin = AdminService(inventory, leases, config, utcnow, metrics, reconciler.wake)
        health = Health({OVERALL: [serving], lease_service: [serving]})
        server = Server(
            [*instrument([lease_service, admin], metrics, gate), health], codec=SafeProtoCodec()
        )
        host, port = _split(listen or config.listen)
        await server.start(host, port, reuse_port=True)
        serving.set(True)
        start_metrics(config, metrics)
        log.info(
            "serving",
            listen=f"{host}:{port}",
            pools=[p.name for p in config.pools],
            provider=config.provider.kind,
            metrics=config.metrics_listen or None,
        )
        try:
            await provider.start(reconciler.provider_changed)
        except ProviderError as err:
            server.close()
            raise StartupError(f"provider {config.provider.kind}: {err}") from None
        async with asyncio.TaskGroup() as tasks:
            background = [
                tasks.create_task(control.run(stop), name="control"),
                tasks.create_task(reconciler.run(stop, control.is_leader), name="reconciler"),
            ]
            for task in background:
                task.add_done_callback(lambda t: _stop_if_died(t, stop))
            await stop.wait()
            # Shutdown order: not serving, stop accepting, drain calls, stop the
            # background work, close the pool.
            serving.set(False)
            waiters.wake_all()
            leaser.stopping()
            drained = await gate.drain(config.shutdown_grace.total_seconds())
            if not drained:
                log.warning("calls still running at shutdown_grace; cancelling them")
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        await provider.close()
        await control.close()
    finally:
        for pool in (background_db, db):
            try:
                await asyncio.wait_for(pool.close(), 5)
            except UNAVAILABLE_ERRORS as err:  # TimeoutError is among them
                log.warning("database pool did not close cleanly", error=repr(err))
                pool.terminate()
    log.info("stopped")


def _stop_if_died(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    if not stop.is_set() and not task.cancelled():
        log.error(
            "background task ended unexpectedly", task=task.get_name(), error=repr(task.exception())
        )
        stop.set()
