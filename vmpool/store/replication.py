"""What the primary says about its replication: its timeline, and whether it
commits synchronously to a standby (docs/operations.md, "What a failover costs").

Both are read with functions any role may call (no pg_monitor needed):
the timeline is the first eight hex digits of the current WAL file's name;
synchronous replication is ``synchronous_standby_names`` set with
``synchronous_commit`` at ``on``, ``remote_write`` or ``remote_apply``.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import structlog

log = structlog.get_logger("vmpool.store")

# Fails on a standby (recovery is in progress): only asked of a writable session.
TIMELINE = "SELECT pg_walfile_name(pg_current_wal_lsn())"

SYNC_SETTINGS = """
SELECT current_setting('synchronous_standby_names') AS names,
       current_setting('synchronous_commit') AS commit,
       (SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum'))
           AS sync_standbys
"""

SYNC_COMMITS = ("on", "remote_write", "remote_apply")


async def timeline(conn: asyncpg.Connection, timeout: float = 5.0) -> int:
    walfile: str = await conn.fetchval(TIMELINE, timeout=timeout)
    return int(walfile[:8], 16)


@dataclass(frozen=True)
class SyncState:
    names: str  # synchronous_standby_names
    commit: str  # synchronous_commit
    # Standbys pg_stat_replication shows as sync or quorum; 0 also when this
    # role may not see them (not pg_monitor): then the settings decide.
    standbys: int

    @property
    def synchronous(self) -> bool:
        return bool(self.names.strip()) and self.commit in SYNC_COMMITS

    def describe(self) -> str:
        if not self.names.strip():
            return "synchronous_standby_names is empty (commits are not replicated first)"
        if self.commit not in SYNC_COMMITS:
            return f"synchronous_commit is {self.commit} (commits do not wait for the standby)"
        return f"synchronous_standby_names {self.names!r}, {self.standbys} sync standbys seen"


async def sync_state(conn: asyncpg.Connection, timeout: float = 5.0) -> SyncState:
    row = await conn.fetchrow(SYNC_SETTINGS, timeout=timeout)
    assert row is not None
    return SyncState(row["names"], row["commit"], int(row["sync_standbys"]))


class TimelineWatch:
    """Remembers the primary's timeline; a change is a promotion (a failover).
    With asynchronous replication that is when acknowledged changes may be
    lost: logged as a warning, counted by the caller."""

    def __init__(self) -> None:
        self.current: int | None = None

    def observe(self, seen: int) -> bool:
        """Record ``seen``; True when it differs from the one seen before."""
        before, self.current = self.current, seen
        if before is None or before == seen:
            return False
        log.warning(
            "database timeline changed: a standby was promoted (failover); with"
            " asynchronous replication, changes acknowledged just before it may be lost",
            timeline_before=before,
            timeline=seen,
        )
        return True
