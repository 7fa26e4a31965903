"""A database connection of its own for readiness (Ping), outside the shared pool.

Under load every pool connection may be busy with client calls (2,000 waiting
Leases, a slow statement); a Ping that queued behind them would report the
database down and take the pod out of the Service (identity.md section 5).
"""

from __future__ import annotations

import asyncio

import asyncpg

from vmpool.store.errors import UNAVAILABLE_ERRORS, StoreUnavailable, translated

PING = "SELECT 1"


class ProbeConnection:
    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one statement at a time on one connection

    async def ping(self, timeout: float) -> None:
        """``SELECT 1`` within ``timeout`` seconds (connecting if needed), or
        StoreUnavailable; a connection that failed is dropped and made anew."""
        try:
            async with asyncio.timeout(timeout), self._lock, translated():
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self._url, server_settings={"application_name": "vmpool-probe"}
                    )
                await self._conn.fetchval(PING)
        except TimeoutError as err:
            self._drop()
            raise StoreUnavailable("database did not answer in time") from err
        except StoreUnavailable:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await asyncio.wait_for(conn.close(), 2)
            except UNAVAILABLE_ERRORS:  # TimeoutError is among them
                conn.terminate()
