"""A database connection of its own for readiness (Ping), outside the shared pool.

Under load every pool connection may be busy with client calls (2,000 waiting
Leases, a slow statement); a Ping that queued behind them would report the
database down and take the pod out of the Service (identity.md section 5).

Ready also means writable: a session on a standby (the URL's address reached
it before its promotion) answers ``SELECT 1`` but refuses every Lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from vmpool.store.connect import ConnectSettings, open_connection
from vmpool.store.errors import UNAVAILABLE_ERRORS, StoreReadOnly, StoreUnavailable, translated

# One round trip: on a hot standby, and with default_transaction_read_only,
# every transaction is read-only.
READ_ONLY = "SELECT current_setting('transaction_read_only') = 'on'"
PING = "SELECT 1"


class ProbeConnection:
    def __init__(
        self,
        url: str,
        settings: ConnectSettings | None = None,
        on_dropped: Callable[[bool], None] = lambda _: None,
    ) -> None:
        """``on_dropped(read_only)``: the connection was dropped after a failure."""
        self._url = url
        self._settings = settings or ConnectSettings()
        self._on_dropped = on_dropped
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one statement at a time on one connection

    async def ping(self, timeout: float) -> None:
        """One statement within ``timeout`` seconds (connecting if needed), or
        StoreUnavailable (StoreReadOnly: it answered, but refuses writes); a
        connection that failed is dropped and made anew."""
        try:
            async with asyncio.timeout(timeout), self._lock, translated():
                if self._conn is None or self._conn.is_closed():
                    self._conn = await open_connection(
                        self._url, self._settings, application_name="vmpool-probe"
                    )
                read_only = await self._conn.fetchval(READ_ONLY)
        except TimeoutError as err:
            self._drop()
            raise StoreUnavailable("database did not answer in time") from err
        except StoreUnavailable as err:
            self._drop(isinstance(err, StoreReadOnly))
            raise
        if read_only:
            self._drop(True)  # the next connection may reach the new primary
            raise StoreReadOnly("database is read-only (a standby, or failing over)")

    def _drop(self, read_only: bool = False) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
            self._on_dropped(read_only)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await asyncio.wait_for(conn.close(), 2)
            except UNAVAILABLE_ERRORS:  # TimeoutError is among them
                conn.terminate()
