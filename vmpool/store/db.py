"""The asyncpg pool and migrations (the embedded PostgreSQL for demos: embedded.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import asyncpg
import structlog

from vmpool.core.backoff import Retry
from vmpool.store.connect import ConnectSettings, open_connection
from vmpool.store.errors import (
    UNAVAILABLE_ERRORS,
    StoreUnavailable,
    read_only,
    retrying,
    translated,
    unavailable,
)

log = structlog.get_logger("vmpool.store")

MIGRATION_LOCK = 0x766D706F6F6C  # "vmpool"; advisory lock key for migrations


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Nothing to reset: pool connections carry no session state (no LISTEN, no SET,
    no session advisory lock; those live on the control connection). asyncpg still
    rolls back an open transaction before calling this. Its default reset query
    (pg_advisory_unlock_all, CLOSE ALL, UNLISTEN *, RESET ALL) would cost one more
    round trip per statement run through the pool (see docs/performance.md)."""


class Database:
    """An asyncpg pool whose connections are handed out first come, first served.

    asyncpg's own queue lets a newcomer take a just-released connection ahead
    of calls already waiting (asyncio.Queue re-queues a woken getter at the
    back), which under load turns into multi-second tails. A fair semaphore
    with one permit per connection sits in front of it.
    """

    def __init__(
        self, pool: asyncpg.Pool, size: int, on_dropped: Callable[[bool], None] = lambda _: None
    ) -> None:
        """``on_dropped(read_only)``: a connection was dropped after an error."""
        self.pool = pool
        self._turns = asyncio.Semaphore(size)
        self._on_dropped = on_dropped

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the pool. One that failed with a lost connection, a
        timeout or a read-only session (a standby: a failover in progress) is
        terminated, not put back: the pool opens a new one, to whichever host
        is the primary then, and releasing never waits on a stalled server."""
        async with self._turns, self.pool.acquire() as conn:
            try:
                yield conn
            except BaseException as err:
                if unavailable(err) and not conn.is_closed():
                    conn.terminate()
                    self._on_dropped(read_only(err))
                raise

    # Single statements run in autocommit: one that hit a deadlock or a
    # serialization failure was rolled back whole, so it is run again.

    async def _run(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        async def once() -> Any:
            async with self.acquire() as conn:
                return await getattr(conn, method)(query, *args)

        return await retrying(once)

    async def execute(self, query: str, *args: Any) -> str:
        result: str = await self._run("execute", query, args)
        return result

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._run("fetch", query, args)
        return rows

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._run("fetchrow", query, args)
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._run("fetchval", query, args)

    async def close(self, timeout: float = 5.0) -> None:
        """Close within ``timeout`` seconds, else drop the connections: a
        database that hangs must not turn a requested stop into a failure."""
        try:
            await asyncio.wait_for(self.pool.close(), timeout)
        except UNAVAILABLE_ERRORS as err:  # TimeoutError is among them
            log.warning("database pool did not close cleanly", error=repr(err))
            self.pool.terminate()

    def terminate(self) -> None:
        self.pool.terminate()


async def create_pool(
    url: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    settings: ConnectSettings | None = None,
    on_dropped: Callable[[bool], None] = lambda _: None,
) -> Database:
    settings = settings or ConnectSettings()

    async def new_connection(dsn: str, **kwargs: Any) -> asyncpg.Connection:
        return await open_connection(dsn, settings, application_name="vmpool", **kwargs)

    async with translated():
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_reset_connection,
            connect=new_connection,
        )
    assert pool is not None
    return Database(pool, max_size, on_dropped)


async def connect(
    url: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    patience: float = 60.0,
    settings: ConnectSettings | None = None,
    on_dropped: Callable[[bool], None] = lambda _: None,
) -> Database:
    """create_pool, retried with backoff for ``patience`` seconds (the database
    may start after us, or be failing over); then StoreUnavailable."""
    deadline = time.monotonic() + patience
    retry = Retry(0.5, 5.0, jitter=False)
    while True:
        try:
            return await create_pool(
                url, min_size=min_size, max_size=max_size, settings=settings, on_dropped=on_dropped
            )
        except StoreUnavailable as err:
            if time.monotonic() > deadline:
                raise
            delay = retry.next_delay()
            log.warning("database not reachable yet", error=str(err), retry_in_s=delay)
            await asyncio.sleep(delay)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every numbered migration, in order."""
    out = []
    folder = resources.files("vmpool.store") / "migrations"
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            version = int(item.name.split("_", 1)[0])
            out.append((version, item.name, item.read_text()))
    return sorted(out)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations in one transaction under an advisory lock, so
    several servers starting at once apply each exactly once."""
    applied: list[str] = []
    async with translated(), conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied.append(name)
    if applied:
        log.info("migrations applied", migrations=applied)
    return applied
