"""The composition root of `vmpool serve`: build every part, run, shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health

from vmpool.api.admin import AdminService
from vmpool.api.extension import ExtensionService
from vmpool.api.lease import LeaseService
from vmpool.api.pool_api import PoolService
from vmpool.api.rpc import Gate, instrument
from vmpool.api.watch import Watch, encode_shared
from vmpool.auth.setup import build_authenticator, startup_warnings
from vmpool.config.schema import Config
from vmpool.control.background import Background, FatalError, SettingNotMet, StartupError
from vmpool.core import gctune
from vmpool.core.address import split_host_port
from vmpool.core.clock import utcnow
from vmpool.ops.metrics import Metrics
from vmpool.process.database import open_database
from vmpool.process.ports import AddressInUse, listen_on, start_metrics
from vmpool.process.signals import stop_on_signals
from vmpool.providers.describers import build_describer
from vmpool.reconciler_process import serve_reconciler
from vmpool.services.catalog import PoolCatalog
from vmpool.services.dbhealth import DatabaseHealth
from vmpool.services.demand import DemandCounter, flush_demand
from vmpool.services.lease_events import EventHub, WatchLimits
from vmpool.services.leaser import Leaser
from vmpool.services.readiness import PROVIDER, READY, HealthName, database_check, provider_check
from vmpool.services.waiters import Waiters
from vmpool.store.autoscale import AutoscaleStore
from vmpool.store.connect import ConnectSettings
from vmpool.store.events import EventStore
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore
from vmpool.store.pools import PoolStore
from vmpool.store.probe import ProbeConnection
from vmpool.wire.codec import SafeProtoCodec
from vmpool.wire.h2guard import GuardedServer
from vmpool.wire.h2limits import GuardSettings
from vmpool.wire.reflection import with_reflection
from vmpool.wire.tls import ReloadingContext, TlsError

log = structlog.get_logger("vmpool")

__all__ = ["AddressInUse", "FatalError", "SettingNotMet", "StartupError", "serve"]


def tls_context(config: Config) -> ReloadingContext | None:
    if not config.tls.enabled:
        return None
    try:
        return ReloadingContext(config.tls)
    except TlsError as err:
        raise StartupError(str(err)) from None


def watch_limits(config: Config) -> WatchLimits:
    lim = config.limits
    return WatchLimits(
        max_streams=lim.max_watch_streams,
        max_streams_per_connection=lim.max_watch_streams_per_connection,
        buffer=lim.watch_buffer,
        heartbeat_s=lim.watch_heartbeat.total_seconds(),
    )


async def serve(
    config: Config,
    url: str,
    *,
    listen: str | None = None,
    role: str = "all",
    reuse_port: bool = False,
    on_forced_exit: Callable[[], None] | None = None,
) -> None:
    """``role``: ``all`` (RPCs and, when leader, the background work), ``api``
    (RPCs only) or ``reconciler`` (the background work only, no port).
    ``on_forced_exit``: see stop_on_signals."""
    if role == "reconciler":
        await serve_reconciler(config, url, on_forced_exit)
        return
    tls = tls_context(config)
    exits = contextlib.AsyncExitStack()
    try:
        auth = await build_authenticator(config, exits)
    except ValueError as err:
        raise StartupError(str(err)) from None
    try:
        await _serve(
            config,
            url,
            listen or config.listen,
            tls,
            auth,
            role=role,
            reuse_port=reuse_port,
            on_forced_exit=on_forced_exit,
        )
    finally:
        await exits.aclose()


async def _serve(
    config: Config,
    url: str,
    listen: str,
    tls: ReloadingContext | None,
    auth: Any,
    *,
    role: str,
    reuse_port: bool,
    on_forced_exit: Callable[[], None] | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = stop_on_signals(loop, on_forced_exit)

    fatal_reasons: list[str] = []  # why the background work stopped the server
    metrics = Metrics()
    metrics.set_pool_sizes((p.name, p.min_ready, p.max_size) for p in config.pools)
    db = await open_database(config, url, on_dropped=metrics.connection_dropped("pool"))
    try:
        inventory = Inventory(db)
        pool_store = PoolStore(db)
        taken = await pool_store.api_names_among([p.name for p in config.pools])
        if taken:
            raise StartupError(
                f"pools: {', '.join(taken)} already exist as API pools (one namespace); "
                "rename the config pool or delete the API pool"
            )
        await inventory.sync_pools([(p.name, p.labels) for p in config.pools])
        leases = LeaseStore(
            db, on_abandoned=lambda pool: metrics.abandoned_claims.labels(pool).inc()
        )
        waiters = Waiters(config.limits.max_waiting_calls)

        # Called from the background thread.
        def fatal(reason: str) -> None:
            fatal_reasons.append(reason)
            loop.call_soon_threadsafe(stop.set)

        def assigned(reservation: str) -> None:
            loop.call_soon_threadsafe(waiters.wake, reservation)

        background = Background(
            config,
            url,
            metrics,
            on_assigned=assigned,
            on_fatal=fatal,
            reconcile=role == "all",
        )
        event_store = EventStore(db)
        hub = EventHub(
            url,
            event_store,
            watch_limits(config),
            encode=encode_shared,
            on_streams=metrics.watch_streams.set,
            settings=ConnectSettings.from_config(config.database),
        )
        demand = DemandCounter()
        leaser = Leaser(
            leases,
            config,
            utcnow,
            waiters,
            metrics,
            on_change=background.wake,
            reconciles_here=background.is_leader,
            catalog=PoolCatalog(config, pool_store),
            demand=demand,
            on_events=hub.poke,
        )

        gate = Gate()
        serving = ServiceStatus()
        # Readiness never waits behind client calls, and fails on a read-only session.
        probe = ProbeConnection(
            url,
            ConnectSettings.from_config(config.database),
            on_dropped=metrics.connection_dropped("probe"),
        )
        db_health = DatabaseHealth(probe, metrics)
        lease_service = LeaseService(leaser, config, db_health, pool_store)
        admin = AdminService(
            inventory,
            leases,
            config,
            utcnow,
            metrics,
            background.wake,
            catalog=PoolCatalog(config, pool_store),
            autoscale=AutoscaleStore(db),
        )
        describer = build_describer(config, db)
        extension = ExtensionService(
            leaser,
            leases,
            utcnow,
            background.wake,
            describe=describer.describe,
            watch=Watch(hub, event_store, metrics),
        )
        pool_service = PoolService(
            pool_store,
            inventory,
            leases,
            config,
            utcnow,
            metrics,
            background.wake,
        )
        ready = [serving, database_check(db_health)]
        health = Health(
            {
                OVERALL: [serving],
                lease_service: ready,
                pool_service: [serving],
                HealthName(READY): ready,
                HealthName(PROVIDER): [provider_check(background.provider_usable)],
            }
        )
        # Services for operators (the admin API and VMPoolService): on the
        # lease port, and alone on admin_listen when that is set.
        operator_services: list[Any] = [pool_service, admin]
        guard = GuardSettings.from_limits(config.limits)
        server = GuardedServer(
            with_reflection(
                [
                    *instrument(
                        [lease_service, extension, *operator_services], metrics, gate, auth
                    ),
                    health,
                ]
            ),
            codec=SafeProtoCodec(),
            settings=guard,
        )
        ssl = tls.context if tls is not None else None
        host, port = await listen_on(server, "listen", listen, reuse_port=reuse_port, ssl=ssl)
        servers: list[GuardedServer] = [server]
        if config.admin_listen:
            admin_server = GuardedServer(
                with_reflection([*instrument(operator_services, metrics, gate, auth), health]),
                codec=SafeProtoCodec(),
                settings=guard,
            )
            await listen_on(
                admin_server, "admin_listen", config.admin_listen, reuse_port=reuse_port, ssl=ssl
            )
            servers.append(admin_server)
        if config.health_listen:
            # Health only, never TLS: what the kubelet's gRPC probes can reach.
            health_server = GuardedServer([health], settings=guard)
            health_host, health_port = split_host_port(config.health_listen, "0.0.0.0")
            await health_server.start(health_host, health_port, reuse_port=True)
            servers.append(health_server)
        for warning in startup_warnings(config, [listen, config.admin_listen]):
            log.warning("insecure configuration", risk=warning)
        try:
            await background.start()
            start_metrics(config, metrics)
        except StartupError:
            for s in servers:
                s.close()
            await background.stop()
            raise
        flush_stop = asyncio.Event()
        flusher = asyncio.create_task(
            flush_demand(demand, AutoscaleStore(db), utcnow, flush_stop, background.wake),
            name="keep:demand",
        )
        serving.set(True)
        gctune.settle()  # start-up's objects out of the collector's way
        log.info(
            "serving",
            listen=f"{host}:{port}",
            admin_listen=config.admin_listen or None,
            tls=tls is not None,
            auth=config.auth.mode,
            pools=[p.name for p in config.pools],
            provider=config.provider.kind,
            metrics=config.metrics_listen or None,
        )
        await stop.wait()
        # Shutdown order: not serving, end watch streams (UNAVAILABLE with a
        # resume cursor), stop taking calls (GOAWAY on every connection:
        # clients move to another replica), drain those in flight, close the
        # port, stop the background work, close the pool.
        serving.set(False)
        await hub.shutdown()
        for s in servers:
            s.goaway()
        waiters.wake_all()
        leaser.stopping()
        grace_ends = time.monotonic() + config.shutdown_grace.total_seconds()
        drained = await gate.drain(config.shutdown_grace.total_seconds())
        if not drained:
            log.warning("calls still running at shutdown_grace; cancelling them")
        else:  # the calls are done; their answers may still be on the way out
            left = max(grace_ends - time.monotonic(), 1.0)
            await asyncio.gather(*(s.answered(left) for s in servers))
        for s in servers:
            s.close()
        await asyncio.gather(*(s.close_connections() for s in servers))
        for s in servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.wait_closed(), 5)
        await background.stop()
        flush_stop.set()
        await flusher
        await db_health.close()
        await probe.close()
        await describer.close()
    finally:
        await db.close()
    if fatal_reasons:  # not asked to stop: say so with the exit status
        log.error("stopped after a fatal error", reason=fatal_reasons[0])
        raise FatalError(fatal_reasons[0])
    log.info("stopped")
