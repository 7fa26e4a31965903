"""The lease clients' extension API (vmpool.admin.v1.VMPoolExtensionService):
CancelReservation and DescribeInstance, checked against the owner, not operator-only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

from vmpool.api.admin import reservations_reply
from vmpool.api.lease import owner_of, reader
from vmpool.api.watch import Watch
from vmpool.core.clock import Clock
from vmpool.core.echo import echo
from vmpool.domain import leasing
from vmpool.proto.vmpool.admin import v1 as adm
from vmpool.providers.base import VMDetails
from vmpool.services.leaser import Leaser
from vmpool.store.leases import LeaseStore
from vmpool.wire.fastwire import timestamp_field

log = structlog.get_logger("vmpool.extension")

Describe = Callable[[str], Awaitable[VMDetails | None]]


async def _nothing_known(name: str) -> VMDetails | None:
    return None


def check_owner(what: str, recorded: tuple[str | None, str], asking: tuple[str, str]) -> None:
    """The caller may act on ``what`` only as its owner: the same principal (when
    one was recorded) and the same service_tag. Pairs are (principal, tag)."""
    if recorded[0] is not None and recorded[0] != asking[0]:
        raise leasing.PermissionDenied(f"reservation_id: {what} belongs to another principal")
    if recorded[1] != asking[1]:
        raise leasing.PermissionDenied(f"service_tag: {what} belongs to another service_tag")


class ExtensionService(adm.VmPoolExtensionServiceBase):
    # Lease clients' calls: the role that may lease (rpc.instrument checks it).
    required_role = "lease"

    def __init__(
        self,
        leaser: Leaser,
        leases: LeaseStore,
        clock: Clock,
        on_change: Callable[[str], None],
        describe: Describe = _nothing_known,
        watch: Watch | None = None,
    ) -> None:
        self._leaser = leaser
        self._leases = leases
        self._clock = clock
        self._on_change = on_change
        self._describe = describe
        self._watch = watch

    async def cancel_reservation(
        self, request: adm.CancelReservationRequest
    ) -> adm.CancelReservationResponse:
        rid = leasing.parse_reservation_id(request.reservation_id)
        tag = leasing.check_service_tag(request.service_tag)
        structlog.contextvars.bind_contextvars(reservation=str(rid), service_tag=echo(tag, 128))
        who = owner_of(tag)
        cancelled = await self._leases.cancel_reservation(rid, tag, who.principal, self._clock())
        if cancelled is not None:
            pool, instance = cancelled
            structlog.contextvars.bind_contextvars(pool=pool)
            self._on_change(pool)  # a set-aside instance is free again; demand fell
            log.info("reservation cancelled", freed=instance)
            return adm.CancelReservationResponse(
                pool=pool, outcome="cancelled", instance=instance or ""
            )
        state = await self._leases.lookup_reservation(rid)
        if state is None or state.kind == "ended":
            raise leasing.NotFound(f"reservation_id: no queued reservation {rid}")
        check_owner(
            f"reservation {rid}", (state.principal, state.service_tag), (who.principal, tag)
        )
        structlog.contextvars.bind_contextvars(pool=state.pool)
        if state.kind == "queued":
            # Served or expired between the two statements: ask again.
            raise leasing.Unavailable(f"reservation_id: reservation {rid} changed, retry")
        assert state.instance is not None
        if not request.release_lease:
            raise leasing.FailedPrecondition(
                f'reservation_id: reservation {rid} was served with instance "{state.instance}";'
                " return it instead (or set release_lease)"
            )
        await self._leaser.return_(state.instance, tag, who.principal)
        log.info("reservation's lease released", instance=state.instance)
        return adm.CancelReservationResponse(
            pool=state.pool, outcome="released", instance=state.instance
        )

    async def list_my_reservations(
        self, request: adm.ListMyReservationsRequest
    ) -> adm.ListReservationsResponse:
        """The caller's own queued reservations: its principal and this tag (with
        auth.mode none every caller is "anonymous": the tag alone decides)."""
        tag = leasing.check_service_tag(request.service_tag)
        pool = leasing.check_text("pool", request.pool)
        who = owner_of(tag)
        return reservations_reply(await self._leases.own_reservations(who.principal, tag, pool))

    async def describe_instance(
        self, request: adm.DescribeInstanceRequest
    ) -> adm.DescribeInstanceResponse:
        lease = await self._leaser.get(request.instance, reader())
        details = await self._describe(lease.instance)
        return adm.DescribeInstanceResponse(
            instance=adm.InstanceDetails(
                instance=lease.instance,
                pool=lease.pool,
                zone=lease.zone,
                addresses=list(details.addresses) if details else [],
                node=details.node if details else "",
                phase=details.phase if details else "",
                leased_at=lease.leased_at,
                expires=timestamp_field(lease.expires_at),
                owner=lease.service_tag,
                reservation_id=str(lease.reservation_id) if lease.reservation_id else "",
            )
        )

    async def watch_leases(self, request: adm.WatchLeasesRequest) -> AsyncIterator[Any]:
        if self._watch is None:
            raise leasing.Unavailable("watch: not served by this process")
        async for event in self._watch.stream(request):
            yield event
