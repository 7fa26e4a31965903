"""Plain records the store hands out; no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID


@dataclass(frozen=True, slots=True)
class LeaseRow:
    instance: str
    pool: str
    service_tag: str
    reservation_id: UUID | None
    leased_at: datetime
    expires_at: datetime
    zone: str

    @classmethod
    def of(cls, row: Any) -> LeaseRow:
        return cls(
            instance=row["instance"],
            pool=row["pool"],
            service_tag=row["service_tag"],
            reservation_id=row["reservation_id"],
            leased_at=row["leased_at"],
            expires_at=row["expires_at"],
            zone=row["zone"],
        )


@dataclass(frozen=True, slots=True)
class ReservationState:
    """What a reservation id refers to: ``lease`` (active), ``queued`` or ``ended``."""

    kind: str
    instance: str | None
    pool: str
    service_tag: str
    expires_at: datetime  # lease/queue expiry; for ``ended``, when it ended
    zone: str | None
    leased_at: datetime | None
    seq: int | None


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


@dataclass(frozen=True, slots=True)
class FirstUse:
    """The outcome of a reservation id's first use: a lease, or a queue place."""

    lease: LeaseRow | None
    seq: int | None
