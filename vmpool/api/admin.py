"""The operator's admin API (vmpool.admin.v1): pool stats and listings.

Pool changes and StopLease are VMPoolService's (vmpool/api/pool_api.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from vmpool.config.schema import Config
from vmpool.core.clock import Clock
from vmpool.domain import leasing
from vmpool.ops.metrics import Metrics
from vmpool.proto.vmpool.admin import v1 as adm
from vmpool.services.catalog import PoolCatalog
from vmpool.store.autoscale import AutoscaleStore
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore
from vmpool.wire.fastwire import timestamp_field

log = structlog.get_logger("vmpool.admin")


def _autoscale_stats(shown: dict[str, Any] | None) -> adm.AutoscaleStats:
    """A stored decision (vmpool.control.autoscaler); none yet: an empty one."""
    if not shown:
        return adm.AutoscaleStats(reason="not decided yet")
    fields = {k: v for k, v in shown.items() if k in adm.AutoscaleStats.__dataclass_fields__}
    return adm.AutoscaleStats(**fields)


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
        catalog: PoolCatalog | None = None,
        autoscale: AutoscaleStore | None = None,
    ) -> None:
        self._inv = inventory
        self._autoscale = autoscale  # the leader's decisions for autoscaled pools
        # Config pools and API pools: an API pool is "configured" too (not removed).
        self._catalog = catalog if catalog is not None else PoolCatalog(config)
        self._leases = leases
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._on_change = on_change

    async def pool_stats(self, request: adm.PoolStatsRequest) -> adm.PoolStatsResponse:
        summary = await self._inv.summary()
        await self._catalog.refresh()
        for cfg in self._config.pools:
            summary.pool(cfg.name)
        now = self._clock()
        decisions = await self._autoscale.decisions() if self._autoscale is not None else {}
        out = []
        for name in sorted(summary.pools):
            p = summary.pools[name]
            pool_cfg = self._catalog.pool(name)
            age = (now - p.oldest_enqueued).total_seconds() if p.oldest_enqueued else 0.0
            extra: dict[str, Any] = {}
            if pool_cfg is not None and pool_cfg.autoscale is not None:
                extra["autoscale"] = _autoscale_stats(decisions.get(name))
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
                    **extra,
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
        return reservations_reply(rows)


def reservations_reply(rows: list[dict[str, Any]]) -> adm.ListReservationsResponse:
    """Queued reservations (rows of the store's listings) as the API answers them."""
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
