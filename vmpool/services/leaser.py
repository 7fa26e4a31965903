"""Lease, Return, ExtendTo and GetLease: the rules of leasing.py applied to the store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import structlog

from vmpool.auth.policy import glob_allows
from vmpool.config.schema import Config, PoolConfig
from vmpool.core import calltime
from vmpool.core.clock import Clock
from vmpool.core.echo import echo
from vmpool.core.instant import Instant
from vmpool.domain import leasing, pools
from vmpool.domain.leasing import Exhausted, FailedPrecondition, NotFound, PermissionDenied
from vmpool.ops.metrics import Metrics
from vmpool.services.catalog import PoolCatalog
from vmpool.services.demand import DemandCounter
from vmpool.services.waiters import Waiters
from vmpool.store.errors import Duplicate, QuotaExceeded
from vmpool.store.leases import LeaseStore, NotLeased, WrongPrincipal, WrongTag
from vmpool.store.records import LeaseRow, Owner

log = structlog.get_logger("vmpool.leaser")

_RACE_RETRIES = 5


@contextmanager
def _owned_lease(instance: str) -> Iterator[None]:
    """The store's answers about someone's lease, as the client's errors."""
    try:
        yield
    except NotLeased:
        raise NotFound(f'instance: no active lease for "{echo(instance)}"') from None
    except WrongPrincipal:
        raise PermissionDenied(
            f'instance: "{echo(instance)}" is leased by another principal'
        ) from None
    except WrongTag:
        raise PermissionDenied(
            f'service_tag: instance "{echo(instance)}" is leased by another service_tag'
        ) from None


def _allowed(pool: str, allowed: tuple[str, ...]) -> str:
    if not glob_allows(allowed, pool):
        raise PermissionDenied(f'pool: "{echo(pool)}" is not among the pools this caller may use')
    return pool


@dataclass(frozen=True, slots=True)
class QueuePlace:
    reservation: UUID
    pool: str
    position: int
    length: int

    def message(self) -> str:
        return leasing.queued_message(self.reservation, self.position, self.length, self.pool)


class Leaser:
    def __init__(
        self,
        store: LeaseStore,
        config: Config,
        clock: Clock,
        waiters: Waiters,
        metrics: Metrics,
        on_change: Callable[[str], None] = lambda _pool: None,
        reconciles_here: Callable[[], bool] = lambda: False,
        catalog: PoolCatalog | None = None,
        demand: DemandCounter | None = None,
        on_events: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._config = config
        self._catalog = catalog if catalog is not None else PoolCatalog(config)
        self._clock = clock
        self._waiters = waiters
        self._metrics = metrics
        self._on_change = on_change
        self._reconciles_here = reconciles_here  # then on_change suffices, no NOTIFY
        self._stopping = False
        self._demand = demand  # Lease attempts on autoscaled pools (issue 24)
        # Lease, Extend and Return record events without a NOTIFY: this wakes
        # this process's WatchLeases reader (migration 0061).
        self._on_events = on_events

    def stopping(self) -> None:
        """Shutdown began: waiting Lease calls answer with their queue place now."""
        self._stopping = True

    async def _pool(self, name: str) -> PoolConfig:
        pool = await self._catalog.find(name)
        if pool is None:
            raise NotFound(f'pool: no pool named "{echo(name)}"')
        return pool

    async def _resolve_pool(self, name: str, allowed: tuple[str, ...] = ("*",)) -> PoolConfig:
        if name:
            return await self._pool(_allowed(leasing.check_text("pool", name), allowed))
        if self._config.default_pool:
            return await self._pool(_allowed(self._config.default_pool, allowed))
        names = [p.name for p in self._config.pools if glob_allows(allowed, p.name)]
        if not names:
            raise NotFound("pool: no pools are configured that this caller may use")
        chosen = leasing.choose_pool(await self._store.free_counts(), names)
        assert chosen is not None
        return await self._pool(chosen)

    async def _refuse_if_drained(self, pool: str) -> None:
        """A claim found nothing: a pool whose desired status is not RUNNING says so."""
        desired = await self._store.pool_desired_status(pool)
        if desired is not None and desired != pools.RUNNING:
            raise FailedPrecondition(pools.not_leasable(pool, desired))

    @contextmanager
    def _quota(self, who: Owner) -> Iterator[None]:
        """A quota refusal from the store, as the client's error (and counted)."""
        try:
            yield
        except QuotaExceeded as err:
            reason = "queued_quota" if "queued" in str(err) else "lease_quota"
            self._metrics.owner_refusals.labels(self._metrics.owner_label(who.key), reason).inc()
            raise Exhausted(echo(str(err), 300)) from None

    def _count(self, who: Owner, lease: LeaseRow | QueuePlace) -> None:
        label = self._metrics.owner_label(who.key)
        if isinstance(lease, LeaseRow):
            self._metrics.owner_leases_by(label).inc()
        else:
            self._metrics.owner_reservations.labels(label).inc()

    def _attempt(self, pool: PoolConfig) -> None:
        if self._demand is not None and pool.autoscale is not None:
            self._demand.add(pool.name)

    def _granted(self, lease: LeaseRow, enqueued_at: datetime | None = None) -> LeaseRow:
        self._on_change(lease.pool)  # one free instance fewer: the pool may need refilling
        self._on_events()
        self._metrics.leases_granted_by(lease.pool).inc()
        if enqueued_at is not None:
            wait = (lease.leased_at - enqueued_at).total_seconds()
            self._metrics.reservation_wait.labels(lease.pool).observe(max(wait, 0.0))
        structlog.contextvars.bind_contextvars(pool=lease.pool, instance=lease.instance)
        return lease

    async def lease(
        self,
        pool_name: str,
        expires: Instant | None,
        tag: str,
        reservation: UUID | None,
        wait: timedelta = timedelta(0),
        owner: Owner | None = None,
        pools: tuple[str, ...] = ("*",),
    ) -> LeaseRow:
        """``owner``: who asks (default: anonymous with ``tag``); ``pools``: the
        pool globs the caller's policy allows."""
        leasing.check_service_tag(tag)
        who = owner or Owner.anonymous(tag)
        expires = leasing.requested_expiry(expires, self._clock())
        if reservation is None:
            pool = await self._resolve_pool(pool_name, pools)
            structlog.contextvars.bind_contextvars(pool=pool.name)
            self._attempt(pool)
            now = self._clock()
            with self._quota(who):
                lease = await self._store.claim_free(
                    pool.name, tag, now, leasing.lease_expiry(expires, now, pool), who
                )
            if lease is None:
                await self._refuse_if_drained(pool.name)
                raise Exhausted(f'pool "{pool.name}": no free instance')
            self._count(who, lease)
            return self._granted(lease)
        # Over limits.max_waiting_calls a call answers at once, as if it asked no wait.
        waiting = wait > timedelta(0) and self._waiters.admit()
        patience = min(wait, leasing.MAX_WAIT).total_seconds() if waiting else 0.0
        deadline = time.monotonic() + patience
        recheck = self._config.limits.wait_recheck.total_seconds()  # NOTIFY is only a hint
        try:
            place: QueuePlace | None = None
            while True:
                # A recheck of a reservation still queued: one statement (_still_queued).
                queued = await self._still_queued(place) if place is not None else None
                outcome = queued or await self._lease_reserved(
                    pool_name, expires, who, reservation, pools
                )
                if isinstance(outcome, LeaseRow):
                    self._count(who, outcome)
                    return outcome
                place = outcome
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    raise Exhausted(place.message())
                with calltime.waiting():
                    await self._waiters.wait(str(reservation), min(remaining, recheck))
        finally:
            if waiting:
                self._waiters.leave()

    async def _still_queued(self, place: QueuePlace) -> QueuePlace | None:
        """A waiting call's recheck of a reservation found queued with nothing set
        aside (owner, tag and pool checked then): one statement keeps it alive and
        reads its place. None: something else happened, or the pool is an API
        pool (its reservation_ttl is read again): look again the long way."""
        pool = self._catalog.pool(place.pool)
        if pool is None:
            return None
        found = await self._store.poll_queued(
            place.reservation, self._clock() + pool.reservation_ttl
        )
        if found is None:
            return None
        return QueuePlace(place.reservation, place.pool, *found)

    async def _lease_reserved(
        self,
        pool_name: str,
        expires: Instant | None,
        who: Owner,
        rid: UUID,
        pools: tuple[str, ...],
    ) -> LeaseRow | QueuePlace:
        structlog.contextvars.bind_contextvars(reservation=str(rid))
        tag = who.service_tag
        counted = False
        for _ in range(_RACE_RETRIES):
            state = await self._store.lookup_reservation(rid)
            if state is None:
                pool = await self._resolve_pool(pool_name, pools)
                structlog.contextvars.bind_contextvars(pool=pool.name)
                if not counted:  # a new reservation is one attempt, however it ends
                    counted = True
                    self._attempt(pool)
                now = self._clock()
                try:
                    with self._quota(who):
                        first = await self._store.claim_or_enqueue(
                            pool.name,
                            tag,
                            rid,
                            now,
                            leasing.lease_expiry(expires, now, pool),
                            now + pool.reservation_ttl,
                            who,
                        )
                except Duplicate:
                    continue  # the same id was used concurrently: look again
                if first is None:
                    await self._refuse_if_drained(pool.name)
                    continue
                if first.lease is not None:
                    return self._granted(first.lease)
                assert first.seq is not None
                self._on_change(pool.name)  # queued demand: provision for it
                position, length = await self._store.position(pool.name, first.seq)
                place = QueuePlace(rid, pool.name, position, length)
                self._count(who, place)  # a new reservation in the queue
                return place
            structlog.contextvars.bind_contextvars(pool=state.pool)
            if state.principal is not None and state.principal != who.principal:
                raise PermissionDenied(
                    f"reservation_id: reservation {rid} belongs to another principal"
                )
            if state.service_tag != tag:
                raise PermissionDenied(
                    f"service_tag: reservation {rid} belongs to another service_tag"
                )
            if pool_name and pool_name != state.pool:
                raise leasing.InvalidArgument(
                    f'reservation_id: reservation {rid} belongs to pool "{state.pool}", '
                    f'not "{pool_name}"'
                )
            if state.kind == "lease":
                assert state.instance is not None and state.leased_at is not None
                structlog.contextvars.bind_contextvars(instance=state.instance)
                return LeaseRow(
                    state.instance,
                    state.pool,
                    tag,
                    rid,
                    state.leased_at,
                    state.expires_at,
                    state.zone or "",
                    who.principal,
                )
            if state.kind == "ended":
                raise FailedPrecondition(
                    f"reservation_id: reservation {rid} was already served with instance "
                    f'"{state.instance}", whose lease has ended; use a new reservation_id'
                )
            pool = await self._pool(state.pool)
            # Paused, stopped or deleted since it queued: refused at once (the
            # reconciler drops the queue on its next pass).
            await self._refuse_if_drained(pool.name)
            now = self._clock()
            if state.instance is None:
                queued = await self._store.touch(rid, now + pool.reservation_ttl)
                if queued is None:
                    continue  # served or expired meanwhile
                if queued.instance is None:
                    position, length = await self._store.position(pool.name, queued.seq)
                    return QueuePlace(rid, pool.name, position, length)
            with self._quota(who):
                served = await self._store.serve_reserved(
                    rid, now, leasing.lease_expiry(expires, now, pool), who.max_active
                )
            if served is not None:
                return self._granted(*served)
        raise leasing.Unavailable("reservation_id: too much contention, retry")

    async def return_(self, instance: str, tag: str, principal: str = "anonymous") -> None:
        leasing.check_instance(instance)
        leasing.check_service_tag(tag)
        structlog.contextvars.bind_contextvars(instance=echo(instance))
        with _owned_lease(instance):
            ended = await self._store.return_lease(
                instance,
                tag,
                self._clock(),
                notify=not self._reconciles_here(),
                principal=principal,
            )
        structlog.contextvars.bind_contextvars(pool=ended.pool)
        held = (self._clock() - ended.leased_at).total_seconds()
        self._metrics.lease_duration_by(ended.pool, "returned").observe(max(held, 0.0))
        self._on_change(ended.pool)  # its VM is to be destroyed
        self._on_events()

    async def extend_to(
        self,
        instance: str,
        to: Instant | None,
        tag: str,
        extend_only: bool,
        principal: str = "anonymous",
    ) -> LeaseRow:
        leasing.check_instance(instance)
        leasing.check_service_tag(tag)
        structlog.contextvars.bind_contextvars(instance=echo(instance))
        target = leasing.check_extend_target(to, self._clock(), extend_only)
        # The caps of an API pool come from the database (a config pool's are at hand).
        api_pool: PoolConfig | None = None
        current = await self._store.get_lease(instance)
        if current is not None and self._config.pool(current.pool) is None:
            api_pool = await self._catalog.find(current.pool)

        def decide(lease: LeaseRow) -> Instant | None:
            pool = self._config.pool(lease.pool)
            if pool is None and api_pool is not None and api_pool.name == lease.pool:
                pool = api_pool
            return leasing.extended_expiry(
                target, self._clock(), lease.leased_at, lease.expires_at, pool, extend_only
            )

        with _owned_lease(instance):
            lease = await self._store.extend(instance, tag, decide, principal)
        self._on_events()
        structlog.contextvars.bind_contextvars(pool=lease.pool)
        return lease

    async def get(self, instance: str, reader: str | None = None) -> LeaseRow:
        """The active lease of ``instance``. With ``reader`` (a principal), only that
        principal's lease: anyone else's answers the same NOT_FOUND as no lease, so a
        lease's existence does not leak to whoever guesses its name."""
        leasing.check_instance(instance)
        structlog.contextvars.bind_contextvars(instance=echo(instance))
        lease = await self._store.get_lease(instance)
        if lease is None or (reader is not None and lease.principal != reader):
            raise NotFound(f'instance: no active lease for "{echo(instance)}"')
        return lease
