"""Lease events (WatchLeases): cursors, what a caller may see, and when a lease is
"expiring". Pure rules; the store reads the events, vmpool.services.lease_events
fans them out.

A cursor is the position (pos, seq) of an event (migration 0060): events are
served in that order, and only once every transaction that could still write
a smaller position has finished. A stream that began with a snapshot also
carries the snapshot (xmin, xmax, in-progress xids) until its position passes
the snapshot's xmax: events of transactions the snapshot already saw are
skipped, and a cursor taken meanwhile keeps that rule for a resumed stream.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field, replace
from datetime import datetime
from uuid import UUID

from vmpool.core.instant import Instant

RECONCILER = "vmpool:reconciler"
DEFAULT_EXPIRING_LEAD_S = 300
MAX_EXPIRING_LEAD_S = 7 * 24 * 3600
# In-progress transactions a snapshot cursor may carry: at most one per
# database connection (max_connections is 100 by default), with room.
MAX_SNAPSHOT_XIDS = 1024
MAX_CURSOR_CHARS = 12_000  # base64 of a cursor with MAX_SNAPSHOT_XIDS
# Positions and sequence numbers are bigint in the database: a larger one in a
# cursor is not one the server gave out (and would fail as a query argument).
MAX_INT8 = 2**63 - 1
_PLAIN, _WITH_SNAPSHOT = 1, 2

KINDS = (
    "leased",
    "extended",
    "expired",
    "returned",
    "stopped",
    "vanished",
    "released",
    "reservation_queued",
    "reservation_served",
    "reservation_cancelled",
    "reservation_expired",
)
ENDS = frozenset({"expired", "returned", "stopped", "vanished", "released"})


class BadCursor(ValueError):
    """Not a cursor WatchLeases gave out."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A PostgreSQL snapshot: which transactions it saw as committed."""

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    def saw(self, txid: int) -> bool:
        """Whether a transaction's changes were visible in the snapshot (it
        committed before it; an aborted one writes no events)."""
        return txid < self.xmin or (txid < self.xmax and txid not in self.xip)


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    pos: int
    seq: int
    snapshot: Snapshot | None = field(default=None, compare=False)

    def after(self, pos: int, seq: int) -> Cursor:
        """The cursor once the event at (pos, seq) has been delivered (or skipped)."""
        snap = self.snapshot
        if snap is not None and pos > snap.xmax:
            snap = None  # no event the snapshot saw can come after this
        return Cursor(pos, seq, snap)

    def skips(self, pos: int, txid: int) -> bool:
        """An event already reflected in the stream's snapshot."""
        return self.snapshot is not None and pos <= self.snapshot.xmax and self.snapshot.saw(txid)

    def encode(self) -> str:
        raw = struct.pack(
            ">BQQ", _PLAIN if self.snapshot is None else _WITH_SNAPSHOT, self.pos, self.seq
        )
        if self.snapshot is not None:
            xip = sorted(self.snapshot.xip)
            raw += struct.pack(
                f">QQH{len(xip)}Q", self.snapshot.xmin, self.snapshot.xmax, len(xip), *xip
            )
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


START = Cursor(0, 0)


def parse_cursor(text: str) -> Cursor:
    """BadCursor unless ``text`` is a cursor WatchLeases gave out."""
    if len(text) > MAX_CURSOR_CHARS:
        raise BadCursor(f"{len(text)} characters, longer than any cursor")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadCursor("not base64") from None
    if len(raw) < 17 or raw[0] not in (_PLAIN, _WITH_SNAPSHOT):
        raise BadCursor("not a cursor from WatchLeases")
    version, pos, seq = struct.unpack_from(">BQQ", raw)
    if pos > MAX_INT8 or seq > MAX_INT8:
        raise BadCursor("not a cursor from WatchLeases")
    if version == _PLAIN:
        if len(raw) != 17:
            raise BadCursor("not a cursor from WatchLeases")
        return Cursor(pos, seq)
    if len(raw) < 35:
        raise BadCursor("not a cursor from WatchLeases")
    xmin, xmax, n = struct.unpack_from(">QQH", raw, 17)
    if len(raw) != 35 + 8 * n or n > MAX_SNAPSHOT_XIDS or xmin > xmax or xmax > MAX_INT8:
        raise BadCursor("not a cursor from WatchLeases")
    xip = frozenset(struct.unpack_from(f">{n}Q", raw, 35))
    return Cursor(pos, seq, Snapshot(xmin, xmax, xip))


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event (a row of lease_events)."""

    pos: int
    seq: int
    txid: int
    at: datetime
    kind: str
    instance: str
    pool: str
    service_tag: str
    principal: str  # the owner's
    cause: str  # who made it happen
    reservation_id: UUID | None
    expires: Instant | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Scope:
    """What one stream shows: None means any. A lease client's scope always
    names its principal; filters narrow it, never widen it."""

    principal: str | None = None
    service_tag: str | None = None
    pool: str = ""
    instance: str = ""

    def sees(self, e: Event) -> bool:
        return (
            (self.principal is None or e.principal == self.principal)
            and (self.service_tag is None or e.service_tag == self.service_tag)
            and (not self.pool or e.pool == self.pool)
            and (not self.instance or e.instance == self.instance)
        )


def scope_for(
    *,
    admin: bool,
    authenticated: bool,
    principal: str,
    service_tag: str | None,
    principal_filter: str,
    pool: str,
    instance: str,
) -> Scope:
    """An admin sees every lease (filters optional: ``principal_filter`` "" is
    any). A lease client sees its own: its principal, and the tag it names;
    with no authentication everyone is "anonymous", so the tag alone is the
    owner and an unnamed tag means the empty tag (what clients send by default)."""
    if admin:
        return Scope(principal_filter or None, service_tag, pool, instance)
    tag = service_tag if service_tag is not None or authenticated else ""
    if principal_filter and principal_filter != principal:
        return Scope(principal, tag, "\0nothing", instance)  # sees nothing, reveals nothing
    return Scope(principal, tag, pool, instance)


def expiring_lead_s(requested: int) -> int | None:
    """Seconds before expiry at which "expiring" is sent: 0 asks for the default
    (5 minutes), a negative value for none. Capped at a week."""
    if requested < 0:
        return None
    if requested == 0:
        return DEFAULT_EXPIRING_LEAD_S
    return min(requested, MAX_EXPIRING_LEAD_S)


def with_snapshot(cursor: Cursor, snapshot: Snapshot) -> Cursor:
    return replace(cursor, snapshot=snapshot)
