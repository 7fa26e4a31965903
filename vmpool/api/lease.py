"""The VMPoolLeaseService handlers: read the request, call the Leaser, build the reply.

The hot requests and replies are vmpool.wire.fastwire's plain records, not
betterproto messages: they keep Timestamps to the nanosecond (see the codec)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import structlog
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Cardinality, Handler
from grpclib.server import Stream

from vmpool.api.rpc import current_stream
from vmpool.auth.caller import caller, check_service_tag_allowed, has_role
from vmpool.config.schema import Config
from vmpool.core.durations import parse_duration
from vmpool.core.echo import echo
from vmpool.domain import leasing
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.services.dbhealth import DatabaseHealth
from vmpool.services.leaser import Leaser
from vmpool.store.pools import PoolStore, SpecRow
from vmpool.store.records import LeaseRow, Owner
from vmpool.wire.codec import PONG
from vmpool.wire.fastwire import ExtendCall, GetLeaseCall, LeaseCall, LeaseReply, ReturnCall

WAIT_HEADER = "x-vmpool-wait"
SERVICE = "/intrinsic_proto.vmpoolleaseapi.v1.VMPoolLeaseService/"
_RETURNED = api.ReturnResponse()


def to_reply(lease: LeaseRow) -> LeaseReply:
    """Every OK Lease, ExtendTo and GetLease answer: the lease, expiry to the nanosecond."""
    return LeaseReply(lease.instance, lease.pool, lease.expires_at, lease.zone)


def _unary(
    handler: Callable[[Any], Awaitable[Any]],
) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
    async def rpc(stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        await stream.send_message(await handler(request))

    return rpc


def owner_of(tag: str) -> Owner:
    """The calling principal with ``tag``, after checking the policy allows the tag."""
    check_service_tag_allowed(tag)
    who = caller()
    return Owner(
        who.principal.name,
        tag,
        who.owner(tag),
        max_queued=who.grant.max_queued_reservations,
        max_active=who.grant.max_active_leases,
    )


def reader() -> str | None:
    """Whose leases the caller may read (GetLease, DescribeInstance): every lease
    with the admin role (None), else only its own principal's. Reads carry no
    service_tag, so with auth.mode none (every caller "anonymous") all callers read
    all leases, as before; docs/security.md, "Ownership"."""
    return None if has_role("admin") else caller().principal.name


def requested_wait() -> timedelta:
    """The x-vmpool-wait metadata, capped at 60 s and at the call's deadline."""
    stream = current_stream.get()
    raw = stream.metadata.get(WAIT_HEADER) if stream.metadata else None
    if raw is None:
        return timedelta(0)
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    try:
        wait = parse_duration(raw)
    except ValueError:
        raise leasing.InvalidArgument(
            f"{WAIT_HEADER}: {echo(raw, 32)!r} is not a duration (e.g. 20s)"
        ) from None
    wait = min(wait, leasing.MAX_WAIT)
    if stream.deadline is not None:
        # Leave time to answer before the caller gives up.
        wait = min(wait, timedelta(seconds=max(stream.deadline.time_remaining() - 0.25, 0)))
    return wait


def api_pool_labels(row: SpecRow) -> dict[str, str]:
    return {
        "hardware_template": row.hardware_template,
        "intrinsic_os": row.intrinsic_os,
        "runtime": row.runtime,
        "tier": row.pool_tier,
    }


class LeaseService:
    # Ping answers without credentials (readiness probes); it tells nothing.
    public_methods = frozenset({"Ping"})

    def __init__(
        self,
        leaser: Leaser,
        config: Config,
        db_health: DatabaseHealth,
        pool_store: PoolStore | None = None,
    ) -> None:
        self._leaser = leaser
        self._config = config
        self._db_health = db_health
        self._pool_store = pool_store  # API pools are listed too

    def __mapping__(self) -> dict[str, Handler]:
        unary = Cardinality.UNARY_UNARY
        return {
            SERVICE + "Ping": Handler(_unary(self.ping), unary, Empty, api.PingResponse),
            SERVICE + "Lease": Handler(
                _unary(self.lease), unary, api.LeaseRequest, api.LeaseResponse
            ),
            SERVICE + "Return": Handler(
                _unary(self.return_), unary, api.ReturnRequest, api.ReturnResponse
            ),
            SERVICE + "ExtendTo": Handler(
                _unary(self.extend_to), unary, api.ExtendToRequest, api.ExtendToResponse
            ),
            SERVICE + "Pools": Handler(
                _unary(self.pools), unary, api.PoolsRequest, api.PoolsResponse
            ),
            SERVICE + "GetLease": Handler(
                _unary(self.get_lease), unary, api.GetLeaseRequest, api.GetLeaseResponse
            ),
        }

    async def ping(self, empty: Empty) -> api.PingResponse:
        await self._db_health.check()
        return PONG

    async def lease(self, request: LeaseCall) -> LeaseReply:
        structlog.contextvars.bind_contextvars(service_tag=echo(request.service_tag, 128))
        reservation = None
        if request.reservation_id is not None:
            reservation = leasing.parse_reservation_id(request.reservation_id)
        wait = requested_wait() if reservation is not None else timedelta(0)
        owner = owner_of(request.service_tag)
        lease = await self._leaser.lease(
            request.pool,
            request.expires,
            request.service_tag,
            reservation,
            wait,
            owner=owner,
            pools=caller().grant.pools,
        )
        return to_reply(lease)

    async def return_(self, request: ReturnCall) -> api.ReturnResponse:
        structlog.contextvars.bind_contextvars(service_tag=echo(request.service_tag, 128))
        owner = owner_of(request.service_tag)
        await self._leaser.return_(request.instance, request.service_tag, owner.principal)
        return _RETURNED

    async def extend_to(self, request: ExtendCall) -> LeaseReply:
        structlog.contextvars.bind_contextvars(service_tag=echo(request.service_tag, 128))
        owner = owner_of(request.service_tag)
        lease = await self._leaser.extend_to(
            request.instance,
            request.to,
            request.service_tag,
            request.extend_only,
            owner.principal,
        )
        return to_reply(lease)

    async def pools(self, request: api.PoolsRequest) -> api.PoolsResponse:
        """Every pool not being deleted: the config's, and the API pools."""
        labels = {p.name: p.labels for p in self._config.pools}
        if self._pool_store is not None:
            for row in await self._pool_store.api_specs(exclude_deleted=True):
                labels.setdefault(row.name, api_pool_labels(row))
        return api.PoolsResponse(
            pools=[
                api.Pool(
                    name=name,
                    labels=[api.Label(key=k, value=v) for k, v in sorted(labels[name].items())],
                )
                for name in sorted(labels)
            ]
        )

    async def get_lease(self, request: GetLeaseCall) -> LeaseReply:
        return to_reply(await self._leaser.get(request.instance, reader()))
