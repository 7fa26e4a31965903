"""Lease and reservation rules (spec sections 2-4). Pure: no I/O, no clock."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import TypeGuard

from vmpool.config.schema import PoolConfig
from vmpool.core.echo import echo
from vmpool.core.instant import GO_ZERO_TIME, UNIX_EPOCH, Instant

MAX_TAG = 128
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


class AlreadyExists(ClientError):
    pass


class Unavailable(ClientError):
    """Not the client's fault: retrying is the right answer."""


def check_service_tag(tag: str) -> str:
    """Any short printable tag; the empty tag is a tag like any other (today's
    public inctl sends it, older builds send "inctl": two different tags)."""
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
        raise InvalidArgument(f"reservation_id: {echo(value)!r} is not a UUID") from None


def given(ts: Instant | None) -> TypeGuard[Instant]:
    """Whether a Timestamp carries a value: not absent, not the Unix epoch (what
    betterproto makes of an absent field), not Go's zero time (inctl's "none")."""
    return ts is not None and ts not in (UNIX_EPOCH, GO_ZERO_TIME)


def _cap(pool: PoolConfig, now: datetime, leased_at: datetime) -> Instant:
    cap = now + pool.max_lease
    if pool.max_lifetime is not None:
        cap = min(cap, leased_at + pool.max_lifetime)
    return Instant.from_datetime(cap)


def requested_expiry(expires: Instant | None, now: datetime) -> Instant | None:
    """A Lease's ``expires`` as it arrives: None if not given; refused if not in
    the future. Checked once, when the call comes in."""
    if not given(expires):
        return None
    if expires <= Instant.from_datetime(now):
        raise InvalidArgument(f"expires: {expires.isoformat()} is not in the future")
    return expires


def lease_expiry(requested: Instant | None, now: datetime, pool: PoolConfig) -> Instant:
    """Expiry of a lease starting now: ``requested_expiry``'s answer (to the
    nanosecond), or the default, capped."""
    if requested is None:
        return min(Instant.from_datetime(now + pool.default_lease), _cap(pool, now, now))
    return min(requested, _cap(pool, now, now))


def check_extend_target(to: Instant | None, now: datetime, extend_only: bool) -> Instant:
    if to is None or not given(to):
        raise InvalidArgument("to: required")
    if to <= Instant.from_datetime(now) and not extend_only:
        raise InvalidArgument(f"to: {to.isoformat()} is not in the future")
    return to


def extended_expiry(
    to: Instant,
    now: datetime,
    leased_at: datetime,
    current: Instant,
    pool: PoolConfig | None,
    extend_only: bool,
) -> Instant | None:
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
