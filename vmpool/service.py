"""The VMPoolLeaseService handlers: read the request, call the Leaser, build the reply."""

from __future__ import annotations

from datetime import timedelta

import structlog
from betterproto.lib.google.protobuf import Empty

from vmpool import leasing
from vmpool.auth.caller import caller, check_service_tag_allowed
from vmpool.config import Config
from vmpool.dbhealth import DatabaseHealth
from vmpool.durations import parse_duration
from vmpool.fastwire import built
from vmpool.leaser import Leaser
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.rpc import current_stream
from vmpool.store.records import LeaseRow, Owner

WAIT_HEADER = "x-vmpool-wait"


def to_proto(lease: LeaseRow) -> api.Lease:
    message: api.Lease = built(
        api.Lease,
        instance=lease.instance,
        pool=lease.pool,
        expires=lease.expires_at,
        zone=lease.zone,
    )
    return message


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
            f"{WAIT_HEADER}: {raw[:32]!r} is not a duration (e.g. 20s)"
        ) from None
    wait = min(wait, leasing.MAX_WAIT)
    if stream.deadline is not None:
        # Leave time to answer before the caller gives up.
        wait = min(wait, timedelta(seconds=max(stream.deadline.time_remaining() - 0.25, 0)))
    return wait


class LeaseService(api.VmPoolLeaseServiceBase):
    def __init__(self, leaser: Leaser, config: Config, db_health: DatabaseHealth) -> None:
        self._leaser = leaser
        self._config = config
        self._db_health = db_health

    async def ping(self, empty: Empty) -> api.PingResponse:
        await self._db_health.check()
        return api.PingResponse(msg="pong")

    async def lease(self, request: api.LeaseRequest) -> api.LeaseResponse:
        structlog.contextvars.bind_contextvars(service_tag=request.service_tag[:128])
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
        response: api.LeaseResponse = built(api.LeaseResponse, lease=to_proto(lease))
        return response

    async def return_(self, request: api.ReturnRequest) -> api.ReturnResponse:
        structlog.contextvars.bind_contextvars(service_tag=request.service_tag[:128])
        owner = owner_of(request.service_tag)
        await self._leaser.return_(request.instance, request.service_tag, owner.principal)
        response: api.ReturnResponse = built(api.ReturnResponse)
        return response

    async def extend_to(self, request: api.ExtendToRequest) -> api.ExtendToResponse:
        structlog.contextvars.bind_contextvars(service_tag=request.service_tag[:128])
        owner = owner_of(request.service_tag)
        lease = await self._leaser.extend_to(
            request.instance,
            request.to,
            request.service_tag,
            request.extend_only,
            owner.principal,
        )
        response: api.ExtendToResponse = built(api.ExtendToResponse, lease=to_proto(lease))
        return response

    async def pools(self, request: api.PoolsRequest) -> api.PoolsResponse:
        return api.PoolsResponse(
            pools=[
                api.Pool(
                    name=p.name,
                    labels=[api.Label(key=k, value=v) for k, v in sorted(p.labels.items())],
                )
                for p in sorted(self._config.pools, key=lambda p: p.name)
            ]
        )

    async def get_lease(self, request: api.GetLeaseRequest) -> api.GetLeaseResponse:
        lease = await self._leaser.get(request.instance)
        response: api.GetLeaseResponse = built(api.GetLeaseResponse, lease=to_proto(lease))
        return response
