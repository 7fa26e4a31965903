"""VMPoolService (intrinsic_proto.vmpoolapi.v1): pools at run time, as `inctl vm pool` calls it.

Handlers validate (vmpool.domain.pools), write one transaction (vmpool.store.pools),
wake the reconciler and answer with what the store then holds.
"""

from __future__ import annotations

from collections.abc import Callable

import betterproto
import structlog
from betterproto.lib.google.protobuf import Empty

from vmpool.api.pool_access import authorize_pool_call
from vmpool.api.rpc import current_stream
from vmpool.auth.caller import caller
from vmpool.config.schema import Config, PoolConfig
from vmpool.core.clock import Clock
from vmpool.core.echo import echo
from vmpool.domain import leasing, pools
from vmpool.domain.autoscale import least_ready
from vmpool.domain.leasing import AlreadyExists, NotFound
from vmpool.domain.spec_hash import pool_spec_hash
from vmpool.ops.metrics import Metrics
from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi
from vmpool.services.catalog import api_spec_hash
from vmpool.store.inventory import Inventory
from vmpool.store.leases import LeaseStore, NotLeased
from vmpool.store.pools import PoolRow, PoolStore, PoolWrite, SetDesiredStatus, SetSpec
from vmpool.wire.fastwire import timestamp_field

log = structlog.get_logger("vmpool.pools")


ORG_HEADER = "x-intrinsic-org"


def _bind_org() -> None:
    """The Go client's org (x-intrinsic-org) is logged, not used to scope pools."""
    stream = current_stream.get(None)
    org = stream.metadata.get(ORG_HEADER) if stream is not None and stream.metadata else None
    if org:
        structlog.contextvars.bind_contextvars(org=echo(org))


def _counts(row: PoolRow, current_hash: str | None) -> pools.Counts:
    stale = 0 if current_hash is None else sum(h != current_hash for h in row.free_hashes)
    return pools.Counts(
        row.provisioning, row.ready, row.reserved, row.leased, row.destroying, stale
    )


class PoolService(papi.VmPoolServiceBase):
    def __init__(
        self,
        store: PoolStore,
        inventory: Inventory,
        leases: LeaseStore,
        config: Config,
        clock: Clock,
        metrics: Metrics,
        on_change: Callable[[str | None], None],
        *,
        authorize: Callable[[str, PoolRow | None], str] = authorize_pool_call,
    ) -> None:
        """``authorize(action, pool row or None)`` raises PermissionDenied or
        returns the caller's principal (recorded as an API pool's owner)."""
        self._store = store
        self._inv = inventory
        self._leases = leases
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._on_change = on_change
        self._authorize = authorize

    # --- answers -------------------------------------------------------------------

    def _running_config(self, row: PoolRow) -> tuple[PoolConfig | None, str | None]:
        """The pool's PoolConfig and the spec hash its VMs should have."""
        if not row.is_api:
            cfg = self._config.pool(row.name)
            return cfg, pool_spec_hash(cfg) if cfg is not None else None
        spec = pools.PoolSpec.of(row)
        cfg = pools.pool_config_for(self._config, row.name, spec)
        return cfg, api_spec_hash(cfg, spec) if cfg is not None else None

    def to_proto(self, row: PoolRow) -> papi.Pool:
        cfg, current_hash = self._running_config(row)
        status = pools.pool_status(
            row.desired_status,
            _counts(row, current_hash),
            min_ready=least_ready(cfg) if cfg is not None else 0,
            max_size=cfg.max_size if cfg is not None else 0,
            reached_running=row.reached_running,
        )
        return papi.Pool(
            name=row.name,
            current_status=status.current,
            desired_status=row.desired_status,
            spec=papi.Spec(
                runtime=row.runtime,
                intrinsic_os=row.intrinsic_os,
                hardware_template=row.hardware_template,
                pool_tier=row.pool_tier,
            ),
            reconciling=status.reconciling,
        )

    async def _listed(self, name: str) -> papi.Pool:
        rows = await self._store.list_with_counts(name)
        if not rows:
            raise NotFound(f'name: no pool named "{echo(name)}"')
        return self.to_proto(rows[0])

    async def _existing(self, name: str, field: str = "name") -> PoolRow:
        pools.check_pool_name(name, field)
        row = await self._store.get(name)
        if row is None or not (row.is_api or row.configured):
            raise NotFound(f'{field}: no pool named "{name}"')
        return row

    # --- pools ---------------------------------------------------------------------

    async def create_pool(self, request: papi.CreatePoolRequest) -> papi.Pool:
        _bind_org()
        name = pools.check_pool_name(request.name)
        structlog.contextvars.bind_contextvars(pool=name)
        owner = self._authorize("create", None)
        if self._config.pool(name) is not None:
            raise AlreadyExists(f'name: pool "{name}" exists ({pools.CONFIG_MANAGED})')
        spec = pools.resolve_spec(self._config, pools.PoolSpec.of(request.spec))
        created = await self._store.create(
            name,
            spec.runtime,
            spec.intrinsic_os,
            spec.hardware_template,
            spec.pool_tier,
            owner,
            self._clock(),
        )
        if not created:
            raise AlreadyExists(f'name: pool "{name}" already exists')
        log.info("pool created", pool=name, owner=owner, **_fields(spec))
        self._on_change(name)
        return await self._listed(name)

    async def list_pools(self, request: papi.ListPoolsRequest) -> papi.ListPoolsResponse:
        _bind_org()
        rows = await self._store.list_with_counts()
        return papi.ListPoolsResponse(pools=[self.to_proto(r) for r in rows])

    async def update_pool(self, request: papi.UpdatePoolRequest) -> papi.Pool:
        _bind_org()
        row = await self._existing(request.name)
        structlog.contextvars.bind_contextvars(pool=row.name)
        self._authorize("update", row)
        pools.check_mutable(row.name, row.desired_status, configured=not row.is_api, what="update")
        mask = request.update_mask
        paths = list(mask.paths) if betterproto.serialized_on_wire(mask) else None
        requested = pools.PoolSpec.of(request.spec)
        pools.mask_fields(paths)  # an unknown path is refused before anything else

        def decide(current: PoolRow) -> PoolWrite | None:
            pools.check_mutable(
                current.name, current.desired_status, configured=not current.is_api, what="update"
            )
            old = pools.PoolSpec.of(current)
            new = pools.updated_spec(self._config, old, requested, paths)
            if new == old:
                return None  # a repeat changes nothing and restarts nothing
            log.info("pool updated", pool=current.name, **_fields(new))
            return SetSpec(*_values(new), self._clock())

        if await self._store.change(row.name, decide) is None:
            raise NotFound(f'name: no pool named "{row.name}"')
        self._on_change(row.name)
        return await self._listed(row.name)

    async def list_hardware_templates(
        self, request: papi.ListHardwareTemplatesRequest
    ) -> papi.ListHardwareTemplatesResponse:
        return papi.ListHardwareTemplatesResponse(
            hw_templates=[
                papi.HardwareTemplate(name=t.name, description=t.description, has_gpu=t.has_gpu)
                for t in self._config.hardware_templates
            ]
        )

    async def list_tiers(self, request: papi.ListTiersRequest) -> papi.ListTiersResponse:
        return papi.ListTiersResponse(
            tiers=[papi.Tier(name=t.name, description=t.description) for t in self._config.tiers]
        )

    async def delete_pool(self, request: papi.DeletePoolRequest) -> Empty:
        await self._set_desired(request.name, pools.DELETED, "delete")
        return Empty()

    async def stop_pool(self, request: papi.StopPoolRequest) -> Empty:
        await self._set_desired(request.name, pools.STOPPED, "stop")
        return Empty()

    async def resume_pool(self, request: papi.ResumePoolRequest) -> Empty:
        await self._set_desired(request.name, pools.RUNNING, "resume")
        return Empty()

    async def pause_pool(self, request: papi.PausePoolRequest) -> Empty:
        await self._set_desired(request.name, pools.PAUSED, "pause")
        return Empty()

    async def _set_desired(self, name: str, desired: str, what: str) -> None:
        _bind_org()
        row = await self._existing(name)
        structlog.contextvars.bind_contextvars(pool=row.name)
        self._authorize(what, row)

        def decide(current: PoolRow) -> PoolWrite | None:
            pools.check_mutable(
                current.name, current.desired_status, configured=not current.is_api, what=what
            )
            if current.desired_status == desired:
                return None  # idempotent
            return SetDesiredStatus(desired, self._clock())

        before = await self._store.change(row.name, decide)
        if before is None:
            raise NotFound(f'name: no pool named "{row.name}"')
        if before.desired_status != desired:
            log.info(
                "pool status", pool=row.name, desired_status=desired, was=before.desired_status
            )
        self._on_change(row.name)

    # --- leases --------------------------------------------------------------------

    async def list_leases(self, request: papi.ListLeasesRequest) -> papi.ListLeasesResponse:
        _bind_org()
        name = leasing.check_text("pool_name", request.pool_name)
        row = await self._existing(name, "pool_name") if name else None
        self._authorize("list_leases", row)
        leases = await self._inv.list_leases(name)
        leases.sort(key=lambda r: (r.expires_at, r.instance))
        return papi.ListLeasesResponse(
            leases=[
                papi.Lease(
                    name=r.instance,
                    pool_name=r.pool,
                    expiration_time=timestamp_field(r.expires_at),  # nanoseconds kept
                )
                for r in leases
            ]
        )

    async def stop_lease(self, request: papi.StopLeaseRequest) -> Empty:
        _bind_org()
        instance = request.lease_name
        if not instance:
            raise leasing.InvalidArgument("lease_name: must not be empty")
        leasing.check_text("lease_name", instance)
        lease = await self._leases.get_lease(instance)
        if lease is None:
            raise NotFound(f'lease_name: no active lease "{echo(instance)}"')
        self._authorize("stop_lease", await self._store.get(lease.pool))
        try:
            ended = await self._leases.force_return(
                instance, self._clock(), "StopLease", by=caller().principal.name
            )
        except NotLeased:
            raise NotFound(f'lease_name: no active lease "{echo(instance)}"') from None
        # The call's audit line names the lease it ended (its principal: the operator).
        structlog.contextvars.bind_contextvars(
            instance=echo(instance), pool=ended.pool, owner=echo(ended.principal, 128)
        )
        held = (self._clock() - ended.leased_at).total_seconds()
        self._metrics.lease_duration.labels(ended.pool, "stopped").observe(max(held, 0.0))
        log.info("lease stopped", instance=instance, pool=ended.pool)
        self._on_change(ended.pool)
        return Empty()


def _values(spec: pools.PoolSpec) -> tuple[str, str, str, str]:
    return (spec.runtime, spec.intrinsic_os, spec.hardware_template, spec.pool_tier)


def _fields(spec: pools.PoolSpec) -> dict[str, str]:
    return dict(zip(pools.SPEC_FIELDS, _values(spec), strict=True))
