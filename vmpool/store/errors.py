"""Store errors: asyncpg's exceptions are translated into these, here and only here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg
import structlog

from vmpool.core.backoff import backoff_delay
from vmpool.core.echo import echo

log = structlog.get_logger("vmpool.store")
T = TypeVar("T")


class StoreError(Exception):
    pass


class StoreUnavailable(StoreError):
    """The database did not answer (down, unreachable, or too slow)."""


class StoreReadOnly(StoreUnavailable):
    """The server refuses writes (a standby, during a failover): retry later."""


class Duplicate(StoreError):
    """A unique constraint rejected the write (e.g. a concurrent retry)."""


class NotLeader(StoreError):
    """A fenced write was refused: this process no longer holds the leader term."""


class QuotaExceeded(StoreError):
    """A quota trigger refused the write; the message names the owner and the limit."""


# SQLSTATEs raised by the quota triggers (migration 0030).
QUOTA_STATES = {"VPQ01", "VPQ02"}

# The session reached a server that refuses writes: a standby still in
# recovery (25006 "cannot execute INSERT in a read-only transaction", "cannot
# execute LISTEN during recovery"; 55000 "recovery is in progress" from WAL
# functions), a database with default_transaction_read_only on, or (asyncpg)
# no host of the URL's list matched target_session_attrs. A failover in
# progress: the connection is dropped and the caller retries (UNAVAILABLE).
READ_ONLY_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
)


def read_only(err: BaseException) -> bool:
    """Whether ``err`` (or what it was translated from) says the server refuses writes."""
    cause = err.__cause__ if isinstance(err, StoreUnavailable) else err
    if isinstance(cause, READ_ONLY_ERRORS):
        return True
    return isinstance(
        cause, asyncpg.exceptions.ObjectNotInPrerequisiteStateError
    ) and "recovery is in progress" in str(cause)


# Everything that means "the connection is lost" or "the server is gone", as
# asyncpg raises it: the caller should retry (UNAVAILABLE at the gRPC layer;
# the background work retries after a backoff and never stops for it).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionResetError, ConnectionRefusedError, BrokenPipeError, ssl errors
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # A closed connection ("connection is closed"), or one left mid-protocol.
    asyncpg.exceptions.InterfaceError,
    # "cannot switch to state ...; another operation is in progress": what a
    # connection lost under a busy statement leaves behind (and ProtocolError).
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up, shutting down
    # 57P01 admin shutdown, 57P02 crash shutdown, 57P04 database dropped,
    # 57P05 idle session timeout, 57014 statement cancelled / timed out.
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    *READ_ONLY_ERRORS,
)


# Errors after which PostgreSQL has rolled the whole transaction back, so
# running it again is safe: deadlock (40P01), serialization failure (40001).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)


# What the background work retries (with a backoff) instead of stopping.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    StoreUnavailable,
    *UNAVAILABLE_ERRORS,
    *TRANSIENT_ERRORS,
)


def unavailable(err: BaseException) -> bool:
    """Whether ``err``, translated or not, means the database is out of reach
    (or, during a failover, reached but read-only)."""
    return isinstance(err, (StoreUnavailable, *UNAVAILABLE_ERRORS)) or read_only(err)


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn asyncpg failures into StoreUnavailable / Duplicate."""
    try:
        yield
    except asyncpg.exceptions.UniqueViolationError as err:
        raise Duplicate(str(err)) from err
    except TRANSIENT_ERRORS as err:  # still failing after the store's retries
        raise StoreUnavailable(f"database busy: {type(err).__name__}: {err}") from err
    except asyncpg.exceptions.PostgresError as err:
        if getattr(err, "sqlstate", None) in QUOTA_STATES:
            raise QuotaExceeded(str(err)) from None
        if read_only(err):
            raise StoreReadOnly(f"database read-only (a standby?): {err}") from err
        if isinstance(err, UNAVAILABLE_ERRORS):  # e.g. AdminShutdownError is a PostgresError
            raise StoreUnavailable(f"database unavailable: {type(err).__name__}: {err}") from err
        raise
    except UNAVAILABLE_ERRORS as err:
        if read_only(err):
            raise StoreReadOnly(f"database read-only: {type(err).__name__}: {err}") from err
        raise StoreUnavailable(f"database unavailable: {type(err).__name__}: {err}") from err


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    attempts: int = 5,
    lost_connections: bool = False,
    base: float = 0.02,
    cap: float = 1.0,
) -> T:
    """Run ``op`` (one whole statement or transaction) again after a deadlock
    or serialization failure, with backoff; with ``lost_connections`` (only for
    work that is safe to repeat), also after the connection was lost. The last
    error propagates untranslated (callers wrap this in ``translated``)."""
    retry_on = TRANSIENT_ERRORS + (UNAVAILABLE_ERRORS if lost_connections else ())
    attempt = 0
    while True:
        attempt += 1
        try:
            return await op()
        except retry_on as err:
            if attempt >= attempts:
                raise
            delay = backoff_delay(attempt, base, cap)
            log.info(
                "transient database error; retrying",
                error=f"{type(err).__name__}: {echo(str(err), 200)}",
                attempt=attempt,
                retry_in_s=round(delay, 3),
            )
            await asyncio.sleep(delay)
