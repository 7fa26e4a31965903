"""A UTC time to the nanosecond.

Clients compare the expiry they get back with the one they asked for to the
nanosecond (inctl's `vm expire-in`), but ``datetime`` stops at microseconds and
betterproto reads a Timestamp into one. Expiries therefore travel as an
``Instant`` from the request bytes, through the lease rules and the store, to
the reply bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS = 1_000_000_000
MIN_SECONDS = -62135596800  # 0001-01-01T00:00:00Z
MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z


def _micros(offset: timedelta) -> int:
    return (offset.days * 86_400 + offset.seconds) * 1_000_000 + offset.microseconds


_MAX_MICROS = _micros(datetime.max.replace(tzinfo=UTC) - _EPOCH)


@dataclass(frozen=True, order=True, slots=True)
class Instant:
    ns: int  # nanoseconds since 1970-01-01T00:00:00Z

    @classmethod
    def of(cls, seconds: int, nanos: int = 0) -> Instant:
        return cls(seconds * _NS + nanos)

    @classmethod
    def from_datetime(cls, value: datetime) -> Instant:
        return cls(_micros(value - _EPOCH) * 1000)

    @property
    def seconds(self) -> int:
        return self.ns // _NS

    @property
    def nanos(self) -> int:
        return self.ns % _NS

    def floor(self) -> datetime:
        """The datetime at or before this instant (microseconds)."""
        return _EPOCH + timedelta(microseconds=self.ns // 1000)

    def ceil(self) -> datetime:
        """The datetime at or after this instant (microseconds; at most datetime.max)."""
        micros = -(-self.ns // 1000)
        return _EPOCH + timedelta(microseconds=min(micros, _MAX_MICROS))

    def __add__(self, other: timedelta) -> Instant:
        return Instant(self.ns + _micros(other) * 1000)

    def __sub__(self, other: Instant) -> timedelta:
        return timedelta(microseconds=(self.ns - other.ns) / 1000)

    def isoformat(self) -> str:
        """RFC 3339 with all nine fractional digits when there are any."""
        base = (_EPOCH + timedelta(seconds=self.seconds)).replace(tzinfo=None).isoformat()
        return f"{base}.{self.nanos:09d}Z" if self.nanos else f"{base}Z"


UNIX_EPOCH = Instant(0)
GO_ZERO_TIME = Instant.of(MIN_SECONDS)  # Go's time.Time{}, 0001-01-01T00:00:00Z
