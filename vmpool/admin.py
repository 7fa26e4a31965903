"""The operator's admin API (vmpool.admin.v1): pool stats, listings, force-return, drain."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from vmpool import leasing
from vmpool.clock import Clock
from vmpool.config import Config
from vmpool.echo import echo
from vmpool.fastwire import timestamp_field
from vmpool.metrics import Metrics
from vmpool.proto.vmpool.admin import v1 as adm
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore, NotLeased

log = structlog.get_logger("vmpool.admin")


class AdminService(adm.VmPoolAdminServiceBase):
    # Every call needs the admin role (with auth.mode none: a loopback caller,
    # unless auth.allow_anonymous_admin); rpc.instrument checks it.
    required_role = "admin"

    def __init__(
        self,
        inventory: Inventory,
        leases: LeaseStore,
        config: Config,
        clock: Clock,
        metrics: Metrics,
        on_change: Callable[[], None],
    ) -> None:
        self._inv = inventory
        self._leases = leases
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._on_change = on_change

    async def pool_stats(self, request: adm.PoolStatsRequest) -> adm.PoolStatsResponse:
        summary = await self._inv.summary()
        for cfg in self._config.pools:
            summary.pool(cfg.name)
        now = self._clock()
        out = []
        for name in sorted(summary.pools):
            p = summary.pools[name]
            pool_cfg = self._config.pool(name)
            age = (now - p.oldest_enqueued).total_seconds() if p.oldest_enqueued else 0.0
            out.append(
                adm.PoolStats(
                    name=name,
                    configured=pool_cfg is not None,
                    drained=p.drained,
                    provisioning=p.counts["provisioning"],
                    ready=p.counts["ready"],
                    reserved=p.counts["reserved"],
                    leased=p.counts["leased"],
                    destroying=p.counts["destroying"],
                    queued=p.queued,
                    oldest_queued_seconds=max(age, 0.0),
                    min_ready=pool_cfg.min_ready if pool_cfg else 0,
                    max_size=pool_cfg.max_size if pool_cfg else 0,
                )
            )
        return adm.PoolStatsResponse(pools=out)

    async def list_leases(self, request: adm.ListLeasesRequest) -> adm.ListLeasesResponse:
        rows = await self._inv.list_leases(leasing.check_text("pool", request.pool))
        return adm.ListLeasesResponse(
            leases=[
                adm.LeaseInfo(
                    instance=r.instance,
                    pool=r.pool,
                    service_tag=r.service_tag,
                    reservation_id=str(r.reservation_id) if r.reservation_id else "",
                    leased_at=r.leased_at,
                    expires=timestamp_field(r.expires_at),
                    zone=r.zone,
                    principal=r.principal,
                )
                for r in rows
            ]
        )

    async def list_reservations(
        self, request: adm.ListReservationsRequest
    ) -> adm.ListReservationsResponse:
        rows = await self._inv.list_reservations(leasing.check_text("pool", request.pool))
        return adm.ListReservationsResponse(
            reservations=[
                adm.ReservationInfo(
                    id=str(r["id"]),
                    pool=r["pool"],
                    service_tag=r["service_tag"],
                    position=int(r["position"]),
                    enqueued_at=r["enqueued_at"],
                    expires=r["expires_at"],
                    instance=r["instance"] or "",
                    principal=r["principal"],
                )
                for r in rows
            ]
        )

    async def force_return(self, request: adm.ForceReturnRequest) -> adm.ForceReturnResponse:
        leasing.check_instance(request.instance)
        leasing.check_text("reason", request.reason)
        reason = f"force-returned: {request.reason}" if request.reason else "force-returned"
        try:
            ended = await self._leases.force_return(request.instance, self._clock(), reason[:200])
        except NotLeased:
            raise leasing.NotFound(
                f'instance: no active lease for "{echo(request.instance)}"'
            ) from None
        held = (self._clock() - ended.leased_at).total_seconds()
        self._metrics.lease_duration.labels(ended.pool, "forced").observe(max(held, 0.0))
        log.info("force return", instance=echo(request.instance), pool=ended.pool, reason=reason)
        self._on_change()
        return adm.ForceReturnResponse()

    async def drain_pool(self, request: adm.DrainPoolRequest) -> adm.DrainPoolResponse:
        await self._set_drained(request.pool, True)
        return adm.DrainPoolResponse()

    async def undrain_pool(self, request: adm.UndrainPoolRequest) -> adm.UndrainPoolResponse:
        await self._set_drained(request.pool, False)
        return adm.UndrainPoolResponse()

    async def _set_drained(self, pool: str, drained: bool) -> None:
        if not pool:
            raise leasing.InvalidArgument("pool: must not be empty")
        leasing.check_text("pool", pool)
        if not await self._inv.set_drained(pool, drained):
            raise leasing.NotFound(f'pool: no pool named "{echo(pool)}"')
        log.info("pool drained" if drained else "pool undrained", pool=pool)
        self._on_change()
