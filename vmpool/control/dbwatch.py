"""Watching the primary across failovers: the timeline at every new control
session, and whether commits wait for a synchronous standby (at start, and at
every new session)."""

from __future__ import annotations

import asyncpg
import structlog

from vmpool.config.database import DatabaseConfig
from vmpool.ops.metrics import Metrics
from vmpool.store import replication
from vmpool.store.db import Database
from vmpool.store.errors import translated

log = structlog.get_logger("vmpool")


class SynchronousStandbyMissing(Exception):
    """database.require_synchronous_standby is true and the server has none."""


class ReplicationWatch:
    """``on_connected`` for the control connection of a process that may lead."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._timeline = replication.TimelineWatch()
        self._synchronous: bool | None = None

    async def on_connected(self, conn: asyncpg.Connection) -> None:
        # On a standby this raises (recovery is in progress): the control
        # loop counts a read-only session and reconnects.
        seen = await replication.timeline(conn)
        self._metrics.database_timeline.set(seen)
        if self._timeline.observe(seen):
            self._metrics.database_timeline_changes.inc()
        state = await replication.sync_state(conn)
        self._metrics.database_synchronous_standby.set(state.synchronous)
        if self._synchronous and not state.synchronous:
            log.warning("database no longer replicates synchronously", detail=state.describe())
        self._synchronous = state.synchronous


async def check_synchronous_standby(db: Database, config: DatabaseConfig) -> None:
    """At start: refuse (SynchronousStandbyMissing) or warn, as configured,
    when commits do not wait for a synchronous standby."""
    wanted = config.require_synchronous_standby
    if wanted is False:
        return
    async with translated(), db.acquire() as conn:
        state = await replication.sync_state(conn)
    if state.synchronous:
        log.info("database replicates synchronously", detail=state.describe())
        return
    message = (
        f"database.require_synchronous_standby: the server has no synchronous standby:"
        f" {state.describe()}; a failover may lose acknowledged leases"
    )
    if wanted is True:
        raise SynchronousStandbyMissing(message)
    log.warning("no synchronous standby", detail=message)
