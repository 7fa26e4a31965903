"""Lease and reservation rules (spec sections 2-4). Pure: no I/O, no clock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from vmpool.config import PoolConfig

MAX_TAG = 128
# "Not given" for a Timestamp: betterproto's decoding of an absent field, and
# Go's zero time as sent by inctl.
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)
MAX_WAIT = timedelta(seconds=60)


class ClientError(Exception):
    """A request the service refuses; the message names the field or object."""


class InvalidArgument(ClientError):
    pass


class NotFound(ClientError):
    pass


class PermissionDenied(ClientError):
    pass


class Exhausted(ClientError):
    pass


class FailedPrecondition(ClientError):
    pass


class Unavailable(ClientError):
    """Not the client's fault: retrying is the right answer."""


def check_service_tag(tag: str) -> str:
    if not tag:
        raise InvalidArgument("service_tag: must not be empty")
    if len(tag) > MAX_TAG:
        raise InvalidArgument(f"service_tag: longer than {MAX_TAG} characters ({len(tag)})")
    if not all(" " <= c <= "~" for c in tag):
        raise InvalidArgument("service_tag: must be printable ASCII")
    return tag


def check_text(field: str, value: str) -> str:
    """Any text that reaches the database: PostgreSQL text cannot hold NUL."""
    if "\x00" in value:
        raise InvalidArgument(f"{field}: must not contain NUL characters")
    return value


def check_instance(instance: str) -> str:
    if not instance:
        raise InvalidArgument("instance: must not be empty")
    return check_text("instance", instance)


def parse_reservation_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"reservation_id: {value[:64]!r} is not a UUID") from None


def given(ts: datetime | None) -> bool:
    """Whether a decoded Timestamp carries a value (see UNIX_EPOCH / GO_ZERO_TIME)."""
    return ts is not None and ts not in (UNIX_EPOCH, GO_ZERO_TIME)


def _cap(pool: PoolConfig, now: datetime, leased_at: datetime) -> datetime:
    cap = now + pool.max_lease
    if pool.max_lifetime is not None:
        cap = min(cap, leased_at + pool.max_lifetime)
    return cap


def lease_expiry(requested: datetime | None, now: datetime, pool: PoolConfig) -> datetime:
    """Expiry of a lease starting now: the request, or the default, capped."""
    if not given(requested):
        return min(now + pool.default_lease, _cap(pool, now, now))
    assert requested is not None
    if requested <= now:
        raise InvalidArgument(f"expires: {requested.isoformat()} is not in the future")
    return min(requested, _cap(pool, now, now))


def check_extend_target(to: datetime | None, now: datetime, extend_only: bool) -> datetime:
    if not given(to):
        raise InvalidArgument("to: required")
    assert to is not None
    if to <= now and not extend_only:
        raise InvalidArgument(f"to: {to.isoformat()} is not in the future")
    return to


def extended_expiry(
    to: datetime,
    now: datetime,
    leased_at: datetime,
    current: datetime,
    pool: PoolConfig | None,
    extend_only: bool,
) -> datetime | None:
    """The new expiry for ExtendTo, or None to leave the lease unchanged."""
    new = to if pool is None else min(to, _cap(pool, now, leased_at))
    if extend_only and new <= current:
        return None
    return new


def choose_pool(free: dict[str, int], open_pools: list[str]) -> str | None:
    """With no pool named and no default: the pool with most free, ties by name."""
    if not open_pools:
        return None
    return min(open_pools, key=lambda p: (-free.get(p, 0), p))


def queued_message(reservation: uuid.UUID, position: int, length: int, pool: str) -> str:
    return (
        f'reservation {reservation} is queued at position {position} of {length} in pool "{pool}"'
    )
