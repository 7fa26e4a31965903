"""WatchLeases: a server stream of lease events (docs/api.md, "WatchLeases").

The stream first catches up from its cursor (pages read from the database, up
to the reader's tail), then joins the process's fan-out (vmpool.services
.lease_events) without a gap: the join happens only when it is at the tail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmpool.api.rpc import current_stream
from vmpool.auth.caller import caller, has_role
from vmpool.core.echo import status_message
from vmpool.core.instant import Instant
from vmpool.domain import leasing
from vmpool.domain.watch import (
    RECONCILER,
    BadCursor,
    Cursor,
    Event,
    Scope,
    expiring_lead_s,
    parse_cursor,
    scope_for,
    with_snapshot,
)
from vmpool.ops.metrics import Metrics
from vmpool.proto.vmpool.admin import v1 as adm
from vmpool.services.lease_events import EventHub, StreamEnded, Subscription
from vmpool.store.events import EventStore
from vmpool.wire.codec import Encoded
from vmpool.wire.fastwire import LeaseEventFields, encode_lease_event, timestamp_field

PAGE = 500
T = adm.LeaseEventType


def _type(value: int) -> adm.LeaseEventType:
    return adm.LeaseEventType(value)


_TYPES = {
    "leased": T.LEASED,
    "extended": T.EXTENDED,
    "expired": T.EXPIRED,
    "returned": T.RETURNED,
    "stopped": T.STOPPED,
    "vanished": T.VANISHED,
    "released": T.RELEASED,
    "reservation_queued": T.RESERVATION_QUEUED,
    "reservation_served": T.RESERVATION_SERVED,
    "reservation_cancelled": T.RESERVATION_CANCELLED,
    "reservation_expired": T.RESERVATION_EXPIRED,
    "lease": T.SNAPSHOT_LEASE,
    "reservation": T.SNAPSHOT_RESERVATION,
}


def message(
    e: Event, cursor: Cursor, *, expiring: bool = False, now: datetime | None = None
) -> adm.LeaseEvent:
    return adm.LeaseEvent(
        cursor=cursor.encode(),
        time=now if expiring and now is not None else e.at,
        type=_type(T.EXPIRING if expiring else _TYPES[e.kind]),
        instance=e.instance,
        pool=e.pool,
        service_tag=e.service_tag,
        owner_principal=e.principal,
        expires=timestamp_field(e.expires) if e.expires is not None else None,  # type: ignore[arg-type]
        reservation_id=str(e.reservation_id) if e.reservation_id else "",
        principal=_cause(e, expiring),
        reason=e.reason,
    )


def _cause(e: Event, expiring: bool) -> str:
    """Who made it happen: EXPIRING is the server's (the event it derives from
    was the leaser's); snapshot rows have no cause."""
    if expiring:
        return RECONCILER
    return "" if e.kind in ("lease", "reservation") else e.cause


def encode_shared(e: Event) -> bytes:
    """The encoding every stream without a snapshot window sends for ``e``
    (the same bytes as ``message``, hand-written: once per event, on the
    reader's path)."""
    fields = LeaseEventFields(
        cursor=Cursor(e.pos, e.seq).encode(),
        time=Instant.from_datetime(e.at),
        type=_TYPES[e.kind],
        instance=e.instance,
        pool=e.pool,
        service_tag=e.service_tag,
        owner_principal=e.principal,
        expires=e.expires,
        reservation_id=str(e.reservation_id) if e.reservation_id else "",
        principal=_cause(e, False),
        reason=e.reason,
    )
    return Encoded(encode_lease_event(fields))


# Filters longer than any name they could match: refused, never compared or
# echoed (pool names are at most 128 characters, Kubernetes names 253).
FILTER_CHARS = {"pool": 128, "instance": 253, "principal": 1024}


def _check_filter(field: str, value: str) -> None:
    limit = FILTER_CHARS[field]
    if len(value) > limit:
        raise leasing.InvalidArgument(f"{field}: longer than {limit} characters ({len(value)})")
    leasing.check_text(field, value)


def request_scope(request: adm.WatchLeasesRequest) -> Scope:
    who = caller()
    _check_filter("pool", request.pool)
    _check_filter("instance", request.instance)
    _check_filter("principal", request.principal)
    tag = request.service_tag  # None: not given (proto3 optional)
    if tag is not None:
        leasing.check_service_tag(tag)
    return scope_for(
        admin=has_role("admin"),
        authenticated=who.principal.authenticated,
        principal=who.principal.name,
        service_tag=tag,
        principal_filter=request.principal,
        pool=request.pool,
        instance=request.instance,
    )


def _ended(why: StreamEnded) -> GRPCError:
    return GRPCError(Status[why.code], status_message(str(why)))


def _check_kept(position: Cursor, horizon: Cursor) -> None:
    """OUT_OF_RANGE when events after ``position`` have been pruned (retention)."""
    if position < horizon:
        raise GRPCError(
            Status.OUT_OF_RANGE,
            "after: the events after this cursor are no longer kept "
            f'(retention); the oldest available is "{horizon.encode()}": '
            "resynchronise (snapshot) and resume from there",
        )


class Watch:
    def __init__(self, hub: EventHub, store: EventStore, metrics: Metrics | None = None) -> None:
        self._hub = hub
        self._store = store
        self._metrics = metrics

    def _refused(self, why: StreamEnded) -> GRPCError:
        if self._metrics is not None:
            self._metrics.watch_refused.labels(why.code).inc()
        return _ended(why)

    async def stream(self, request: adm.WatchLeasesRequest) -> AsyncIterator[Any]:
        after: Cursor | None = None
        if request.after:
            try:
                after = parse_cursor(request.after)
            except BadCursor as err:
                raise leasing.InvalidArgument(f"after: {err}") from None
            if request.snapshot:
                raise leasing.InvalidArgument("snapshot: not with after (resume from the cursor)")
        scope = request_scope(request)
        lead = expiring_lead_s(request.expiring_lead_seconds)
        grpc_stream = current_stream.get()
        peer = grpc_stream.peer.addr() if grpc_stream.peer else None
        try:
            sub = await self._hub.open(scope, lead, peer)
        except StreamEnded as why:
            raise self._refused(why) from None
        try:
            async for item in self._run(sub, request, after):
                yield item
        finally:
            self._hub.close(sub)

    async def _run(
        self, sub: Subscription, request: adm.WatchLeasesRequest, after: Cursor | None
    ) -> AsyncIterator[Any]:
        hub = self._hub
        if request.snapshot:
            view = await self._store.snapshot()
            sub.position = with_snapshot(Cursor(view.snapshot.xmin, 0), view.snapshot)
            for e in [*view.leases, *view.reservations]:
                if sub.scope.sees(e):
                    yield message(e, sub.position)
            yield adm.LeaseEvent(
                cursor=sub.position.encode(), type=_type(T.SNAPSHOT_END), time=datetime.now(UTC)
            )
        elif after is not None:
            # hub.xmax is as of the reader's last look; a cursor another replica
            # gave out since may be beyond it: ask the database before refusing.
            if after.pos > hub.xmax and after.pos > await self._store.xmax():
                raise leasing.InvalidArgument("after: a cursor this database has not reached")
            _check_kept(after, await self._store.horizon())  # whatever this process holds
            sub.position = after
        # Catch up from the database until at the reader's tail, then go live.
        while not hub.go_live(sub):
            if sub.ended is not None:
                break
            page = await self._store.page(sub.position, hub.tail, PAGE)
            _check_kept(sub.position, page.horizon)
            for e in page.events:
                skip = not sub.scope.sees(e) or sub.position.skips(e.pos, e.txid)
                position = sub.position.after(e.pos, e.seq)
                if not skip:
                    yield message(e, position)
                sub.position = position
            if len(page.events) < PAGE and page.upto > sub.position:
                sub.position = sub.position.after(page.upto.pos, page.upto.seq)
        if not request.snapshot and sub.ended is None:
            # The first message: where this stream starts (resume from here).
            yield adm.LeaseEvent(
                cursor=sub.position.encode(), type=_type(T.HEARTBEAT), time=datetime.now(UTC)
            )
        async for item in self._live(sub):
            yield item

    async def _live(self, sub: Subscription) -> AsyncIterator[Any]:
        hub = self._hub
        beat = hub.limits.heartbeat_s
        while True:
            while sub.queue:
                e, encoded, expiring = sub.queue.popleft()
                if expiring:
                    yield message(e, sub.position, expiring=True, now=datetime.now(UTC))
                    continue
                sub.position = sub.position.after(e.pos, e.seq)
                if encoded is not None and sub.position.snapshot is None:
                    yield encoded
                else:
                    yield message(e, sub.position)
            if sub.ended is not None:
                raise self._refused(sub.ended)
            # Queue empty: every event up to the reader's tail that this stream
            # may see has been delivered (offers are synchronous), so its
            # cursor moves there too (heartbeats then resume from it).
            tail = hub.tail
            if tail > sub.position and tail >= sub.floor:
                sub.position = sub.position.after(tail.pos, tail.seq)
            if await sub.idle(beat):
                yield adm.LeaseEvent(
                    cursor=sub.position.encode(), type=_type(T.HEARTBEAT), time=datetime.now(UTC)
                )
