"""Plain records the store hands out; no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from vmpool.core.instant import Instant

R = TypeVar("R")
_COLUMNS: dict[type, tuple[str, ...]] = {}


def expiry_columns(expires: Instant) -> tuple[datetime, int]:
    """(expires_at, expires_round_ns): rounded up to the microsecond, and by how much."""
    at = expires.ceil()
    return at, max(Instant.from_datetime(at).ns - expires.ns, 0)


def expiry_of(row: Any) -> Instant:
    return Instant(Instant.from_datetime(row["expires_at"]).ns - row["expires_round_ns"])


def record_of(cls: type[R], row: Any, **computed: Any) -> R:
    """A record dataclass from a row: each field from the column of its name,
    but those given in ``computed`` (an expiry, a default for NULL)."""
    columns = _COLUMNS.get(cls)
    if columns is None:
        columns = _COLUMNS[cls] = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    return cls(**{c: row[c] for c in columns if c not in computed}, **computed)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who makes a lease or reservation: the principal and the service_tag must
    both match to act on it; ``key`` is what quotas count (0: no limit)."""

    principal: str
    service_tag: str
    key: str
    max_queued: int = 0
    max_active: int = 0

    @classmethod
    def anonymous(cls, service_tag: str) -> Owner:
        return cls("anonymous", service_tag, service_tag)


@dataclass(frozen=True, slots=True)
class LeaseRow:
    instance: str
    pool: str
    service_tag: str
    reservation_id: UUID | None
    leased_at: datetime
    expires_at: Instant
    zone: str
    principal: str = "anonymous"

    @classmethod
    def of(cls, row: Any) -> LeaseRow:
        return record_of(
            cls, row, expires_at=expiry_of(row), principal=row.get("principal") or "anonymous"
        )


@dataclass(frozen=True, slots=True)
class ReservationState:
    """What a reservation id refers to: ``lease`` (active), ``queued`` or ``ended``."""

    kind: str
    instance: str | None
    pool: str
    service_tag: str
    expires_at: Instant  # lease/queue expiry; for ``ended``, when it ended
    zone: str | None
    leased_at: datetime | None
    seq: int | None
    principal: str | None = "anonymous"  # None: not recorded (old history)


@dataclass(frozen=True, slots=True)
class Queued:
    """A reservation in the queue: set aside (instance) or waiting."""

    instance: str | None
    seq: int
    pool: str


@dataclass(frozen=True, slots=True)
class EndedLease:
    instance: str
    pool: str
    service_tag: str
    leased_at: datetime
    principal: str = "anonymous"


@dataclass(frozen=True, slots=True)
class FirstUse:
    """The outcome of a reservation id's first use: a lease, or a queue place."""

    lease: LeaseRow | None
    seq: int | None
