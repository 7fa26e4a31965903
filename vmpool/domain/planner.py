"""The reconciler's decisions (spec sections 5-6) as plain functions: no I/O.

``plan_pools(observed, targets, wall_now, mono_now)`` looks at per-pool counts
and says what to expire, drop, destroy, set aside and create;
``plan_rows(...)`` looks at instance rows next to the provider's VMs and says
which boots are done or failed, which deletions are confirmed, which VMs
vanished, and which VMs to create or delete. Each decision is a small frozen
dataclass; the executor (vmpool.control.executor) applies them. tests/unit/
domain/test_planner.py has one test per rule of the spec.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vmpool.config.schema import PoolConfig
from vmpool.domain.spec_hash import pool_spec_hash

# --- what the pool should be -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """What a pool should look like, whatever its source (the config file, or a
    pool made through the pool API with a desired status mapped onto these
    fields). A pool with no target (removed from the config) is drained."""

    name: str
    accepting_leases: bool = True  # False: its queue is dropped, nothing is set aside
    keep_free: bool = True  # False: free VMs are destroyed and none are made
    min_ready: int = 0
    max_size: int = 0
    max_provisioning: int = 1
    spec_hash: str = ""
    max_ready_age: timedelta | None = None
    boot_timeout: timedelta = timedelta(minutes=10)
    zone: str = ""  # given: overrides the zone the provider reports
    #: min_ready is an autoscaled S (vmpool.domain.autoscale): free VMs above
    #: S (+ waiting calls) are destroyed, oldest first, as S falls.
    autoscaled: bool = False


def target_from_config(pool: PoolConfig, *, drained: bool = False) -> PoolTarget:
    return PoolTarget(
        name=pool.name,
        accepting_leases=not drained,
        keep_free=not drained,
        min_ready=pool.min_ready,
        max_size=pool.max_size,
        max_provisioning=pool.max_provisioning,
        spec_hash=pool_spec_hash(pool),
        max_ready_age=pool.max_ready_age,
        boot_timeout=pool.boot_timeout,
        zone=pool.zone,
    )


def drained_target(name: str) -> PoolTarget:
    return PoolTarget(name, accepting_leases=False, keep_free=False)


# --- what the store reports ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolObserved:
    name: str
    ready: int = 0
    ready_current: int = 0  # of those, made from the pool's current spec
    provisioning: int = 0
    provisioning_current: int = 0
    reserved: int = 0
    leased: int = 0
    destroying: int = 0
    waiting: int = 0  # queued reservations with nothing set aside
    set_aside: int = 0
    oldest_ready: datetime | None = None
    next_reservation_expiry: datetime | None = None

    @property
    def total(self) -> int:
        """Instances that count against max_size (all but destroying)."""
        return self.ready + self.provisioning + self.reserved + self.leased

    @property
    def queued(self) -> int:
        return self.waiting + self.set_aside


@dataclass(frozen=True, slots=True)
class Observed:
    pools: Mapping[str, PoolObserved]
    next_lease_expiry: datetime | None = None
    complete: bool = True  # every pool was looked at (else only those in ``pools``)
    #: pool -> monotonic time before which no VM is made (boot failures repeat)
    pool_backoff_until: Mapping[str, float] = field(default_factory=dict)


# --- pool-level actions ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpireLeases:
    """End every lease past its expiry; their VMs are destroyed."""


@dataclass(frozen=True, slots=True)
class ExpireReservations:
    """Drop reservations past their expiry (in these pools; None: in all); what
    was set aside is free again."""

    pools: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class DropQueue:
    pool: str


@dataclass(frozen=True, slots=True)
class DestroyFree:
    """Destroy every free (ready or provisioning) instance of the pool."""

    pool: str
    reason: str = "pool drained"


@dataclass(frozen=True, slots=True)
class Recycle:
    """Destroy the free instances that became ready at or before ``cutoff``."""

    pool: str
    cutoff: datetime
    reason: str = "max_ready_age"


@dataclass(frozen=True, slots=True)
class ReplaceStale:
    """Destroy up to ``limit`` instances in ``state`` not made from ``spec_hash``."""

    pool: str
    spec_hash: str
    state: str  # "ready" or "provisioning"
    limit: int
    reason: str = "template changed"


@dataclass(frozen=True, slots=True)
class Shrink:
    """Destroy up to ``limit`` ready instances, oldest first (an autoscaled S fell)."""

    pool: str
    limit: int
    reason: str = "autoscale: desired ready fell"


@dataclass(frozen=True, slots=True)
class SetAside:
    """Pair up to ``limit`` free instances with waiting reservations, oldest first."""

    pool: str
    limit: int


@dataclass(frozen=True, slots=True)
class Create:
    """Write ``count`` new instance rows (then create their VMs)."""

    pool: str
    count: int
    spec_hash: str
    max_size: int  # the database refuses rows beyond it (two leaders overlapping)


PoolAction = (
    ExpireLeases | ExpireReservations | DropQueue | DestroyFree | Recycle | ReplaceStale | Shrink
)
Action = PoolAction | SetAside | Create


def _due(at: datetime | None, now: datetime) -> bool:
    return at is not None and at <= now


def reservations_held(led_for: float, ttls: Mapping[str, timedelta]) -> frozenset[str]:
    """Pools whose reservations a leader of ``led_for`` seconds does not expire
    yet: for its first ``reservation_ttl`` no client could renew (no leader, or
    no server, ran before), so expiring at once would drop whoever had not
    retried yet and break FIFO."""
    return frozenset(name for name, ttl in ttls.items() if led_for < ttl.total_seconds())


def plan_pools(
    observed: Observed,
    targets: Mapping[str, PoolTarget],
    wall_now: datetime,
    mono_now: float,
    *,
    held: frozenset[str] = frozenset(),
) -> list[Action]:
    """Every pool-level decision for one pass, in the order to apply them
    (``held``: pools whose reservations are not expired yet)."""
    actions: list[Action] = []
    if _due(observed.next_lease_expiry, wall_now):
        actions.append(ExpireLeases())
    due = [n for n, p in observed.pools.items() if _due(p.next_reservation_expiry, wall_now)]
    if due and not held:
        actions.append(ExpireReservations())
    elif expiring := tuple(sorted(n for n in due if n not in held)):
        actions.append(ExpireReservations(expiring))
    names = sorted(set(observed.pools) | (set(targets) if observed.complete else set()))
    for name in names:
        target = targets.get(name) or drained_target(name)
        pool = observed.pools.get(name) or PoolObserved(name)
        backoff_until = observed.pool_backoff_until.get(name)
        blocked = backoff_until is not None and mono_now < backoff_until
        actions.extend(plan_pool(pool, target, wall_now, blocked=blocked))
    return actions


def plan_pool(
    pool: PoolObserved, target: PoolTarget, wall_now: datetime, *, blocked: bool = False
) -> list[Action]:
    """One pool: drain, recycle, roll out a new spec, set aside, refill.

    ``blocked``: the pool is in boot-failure backoff, so no VM is made and no
    old VM is destroyed to make room for one."""
    actions: list[Action] = []
    name = target.name
    if not target.accepting_leases and pool.queued:
        actions.append(DropQueue(name))
    if not target.keep_free:
        if pool.ready or pool.provisioning or pool.reserved:
            actions.append(DestroyFree(name))
        return actions
    if target.max_ready_age is not None and _due(
        pool.oldest_ready, wall_now - target.max_ready_age
    ):
        actions.append(Recycle(name, wall_now - target.max_ready_age))

    # Template rollout. A stale boot is stopped at once: nobody can have used it.
    stale_booting = pool.provisioning - pool.provisioning_current
    if stale_booting > 0:
        actions.append(ReplaceStale(name, target.spec_hash, "provisioning", stale_booting))
    need = target.min_ready + (pool.waiting if target.accepting_leases else 0)
    ready_now, stale_ready = pool.ready_current, pool.ready - pool.ready_current
    booting = pool.provisioning_current
    total = pool.total - max(stale_booting, 0)
    # New first: a stale free VM goes once the pool has enough free without it.
    drop = min(stale_ready, max(0, pool.ready - need))
    want = need - ready_now - booting
    can_boot = target.max_provisioning - booting
    headroom = target.max_size - (total - drop)
    step = min(want, can_boot)
    if step > headroom and not blocked and booting == 0 and stale_ready > drop:
        # max_size leaves no room for the replacements: the limits do not allow
        # keeping min_ready available, so free room one batch at a time.
        extra = min(stale_ready - drop, step - max(headroom, 0))
        drop += extra
        headroom += extra
    if drop > 0:
        actions.append(ReplaceStale(name, target.spec_hash, "ready", drop))
    if target.autoscaled and want < 0 and not pool.waiting and ready_now > 0:
        actions.append(Shrink(name, min(-want, ready_now)))

    ready_left = pool.ready - drop
    if target.accepting_leases and pool.waiting and ready_left > 0:
        actions.append(SetAside(name, pool.waiting))
    count = min(want, can_boot, headroom)
    if count > 0 and not blocked:
        actions.append(Create(name, count, target.spec_hash, target.max_size))
    return actions


# --- rows next to the provider's VMs --------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """An instance row as the reconciler sees it."""

    name: str
    pool: str
    state: str
    created_at: datetime
    spec_hash: str = ""
    destroy_reason: str | None = None


@dataclass(frozen=True, slots=True)
class VM:
    """What the provider reports about a VM (see vmpool.providers.base.VMStatus)."""

    name: str
    ready: bool = False
    failed: bool = False
    deleting: bool = False
    zone: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class MarkReady:
    name: str
    zone: str


@dataclass(frozen=True, slots=True)
class BootFailed:
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class CreateVM:
    """A provisioning row has no VM yet: create it (idempotent by name)."""

    name: str
    pool: str


@dataclass(frozen=True, slots=True)
class DeleteVM:
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Forget:
    """The provider confirms these VMs are gone: their rows go."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Vanished:
    """VMs of free or leased rows, or of booting rows that had been seen, disappeared
    behind our back."""

    names: tuple[str, ...]


RowAction = MarkReady | BootFailed | CreateVM | DeleteVM | Forget | Vanished


def plan_rows(
    rows: Iterable[Row],
    vms: Mapping[str, VM],
    targets: Mapping[str, PoolTarget],
    wall_now: datetime,
    *,
    busy: frozenset[str] = frozenset(),
    orphans_since: Mapping[str, datetime] | None = None,
    orphan_grace: timedelta = timedelta(minutes=10),
    disappeared: frozenset[str] = frozenset(),
) -> list[RowAction]:
    """Boots, deletions and drift. ``busy``: names with a provider call in flight
    (left alone). ``orphans_since``: VMs with no row and when they were first
    seen so (None: ``rows`` is not every row, so no orphan check).
    ``disappeared``: VMs the provider showed last time and no longer does (deleted,
    not "not shown yet"): a booting row among them is vanished at once, so the
    pool gets a replacement under a new name now rather than after RECREATE_AFTER."""
    out: list[RowAction] = []
    gone: list[str] = []
    lost: list[str] = []
    names: set[str] = set()
    for row in rows:
        names.add(row.name)
        vm = vms.get(row.name)
        target = targets.get(row.pool)
        if row.state == "provisioning":
            if vm is not None and vm.ready and not vm.deleting:
                zone = target.zone if target is not None and target.zone else vm.zone
                out.append(MarkReady(row.name, zone))
                continue
            timeout = target.boot_timeout if target is not None else timedelta(minutes=10)
            if vm is not None and vm.failed:
                out.append(BootFailed(row.name, vm.reason or "boot failed"))
            elif vm is None and row.name in disappeared and row.name not in busy:
                lost.append(row.name)
            elif row.created_at + timeout <= wall_now:
                out.append(BootFailed(row.name, "boot_timeout"))
            elif vm is None and target is not None and row.name not in busy:
                out.append(CreateVM(row.name, row.pool))
        elif row.state == "destroying":
            if vm is None:
                gone.append(row.name)
            elif not vm.deleting and row.name not in busy:
                out.append(DeleteVM(row.name, row.destroy_reason or ""))
        elif vm is None:  # ready, reserved or leased
            lost.append(row.name)
    if gone:
        out.append(Forget(tuple(gone)))
    if lost:
        out.append(Vanished(tuple(lost)))
    if orphans_since is not None:
        for name, vm in sorted(vms.items()):
            if name in names or name in busy or vm.deleting:
                continue
            first = orphans_since.get(name)
            if first is not None and wall_now - first >= orphan_grace:
                out.append(DeleteVM(name, "orphan"))
    return out


def orphans_seen(
    rows: Iterable[str],
    vms: Mapping[str, VM],
    before: Mapping[str, datetime],
    wall_now: datetime,
) -> dict[str, datetime]:
    """VMs with no row, each with when it was first seen so (bookkeeping for
    plan_rows' orphan grace)."""
    have = set(rows)
    return {
        name: before.get(name, wall_now)
        for name, vm in vms.items()
        if name not in have and not vm.deleting
    }
