"""Store errors: asyncpg's exceptions are translated into these, here and only here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg


class StoreError(Exception):
    pass


class StoreUnavailable(StoreError):
    """The database did not answer (down, unreachable, or too slow)."""


class Duplicate(StoreError):
    """A unique constraint rejected the write (e.g. a concurrent retry)."""


class QuotaExceeded(StoreError):
    """A quota trigger refused the write; the message names the owner and the limit."""


# SQLSTATEs raised by the quota triggers (migration 0030).
QUOTA_STATES = {"VPQ01", "VPQ02"}

UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.QueryCanceledError,
)


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn asyncpg failures into StoreUnavailable / Duplicate."""
    try:
        yield
    except asyncpg.exceptions.UniqueViolationError as err:
        raise Duplicate(str(err)) from err
    except asyncpg.exceptions.PostgresError as err:
        if getattr(err, "sqlstate", None) in QUOTA_STATES:
            raise QuotaExceeded(str(err)) from None
        raise
    except UNAVAILABLE_ERRORS as err:
        raise StoreUnavailable(f"database unavailable: {type(err).__name__}: {err}") from err
