"""The executor: applies the planner's actions (vmpool.domain.planner) to the
store, and owns the provider calls they start.

Each store step is one transaction; provider calls run as owned tasks, bounded
in number, so a slow API never stalls a pass, and every call is idempotent by
VM name, so a crash anywhere is repaired by a later pass.
"""

from __future__ import annotations

import asyncio
import functools
import random
import secrets
import string
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from hashlib import sha256
from typing import Any

import structlog

from vmpool.config.schema import PoolConfig
from vmpool.control.leadership import Leadership
from vmpool.core.backoff import Backoff, Monotonic
from vmpool.core.clock import Clock
from vmpool.core.echo import echo
from vmpool.domain.planner import (
    Action,
    BootFailed,
    Create,
    CreateVM,
    DeleteVM,
    DestroyFree,
    DropQueue,
    ExpireLeases,
    ExpireReservations,
    Forget,
    MarkReady,
    Recycle,
    ReplaceStale,
    RowAction,
    SetAside,
    Shrink,
    Vanished,
)
from vmpool.ops import audit
from vmpool.ops.metrics import Metrics
from vmpool.providers.base import Provider
from vmpool.providers.errors import Invalid, ProviderError
from vmpool.services.catalog import PoolCatalog
from vmpool.store.autoscale import AutoscaleStore
from vmpool.store.errors import StoreError
from vmpool.store.inventory import Inventory

log = structlog.get_logger("vmpool.reconciler")

_ALPHABET = string.ascii_lowercase + string.digits
RECREATE_AFTER = 30.0  # a provisioning row with no VM this long after create: create again

_names = random.Random(secrets.randbits(128))  # unique enough; no syscall per name


@functools.cache
def _pool_tag(pool: str) -> str:
    return sha256(pool.encode()).hexdigest()[:4]


def new_instance_name(pool: str) -> str:
    """``vmp-<pool hash>-<random>``, a DNS label clients recognise by its prefix."""
    return f"vmp-{_pool_tag(pool)}-{''.join(_names.choices(_ALPHABET, k=8))}"


class Executor:
    def __init__(
        self,
        inventory: Inventory,
        provider: Provider,
        pools: PoolCatalog,
        clock: Clock,
        monotonic: Monotonic,
        metrics: Metrics,
        leadership: Leadership,
        *,
        on_assigned: Callable[[str], None],
        on_call_done: Callable[[], None],
        on_deleted: Callable[[], None],
        concurrency: int,
        autoscale: AutoscaleStore | None = None,
        on_boot: Callable[[str, float], None] = lambda _pool, _seconds: None,
    ) -> None:
        self._autoscale = autoscale  # picks the VMs an autoscaled pool sheds
        self._on_boot = on_boot  # a VM of this pool booted in this many seconds
        self._inv = inventory
        self._provider = provider
        self._pools = pools
        self._clock = clock
        self._mono = monotonic
        self._metrics = metrics
        self._leadership = leadership
        self._on_assigned = on_assigned  # an instance was set aside for this reservation
        self._on_call_done = on_call_done  # a provider call ended: a pass soon
        self._on_deleted = on_deleted  # a VM deletion was accepted: look at the provider
        self._calls = asyncio.Semaphore(concurrency)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._attempts = Backoff(base=2.0, cap=60.0, clock=monotonic)  # per VM name
        #: per pool: boots fail (the planner reads when each pool may create again)
        self.pool_backoff = Backoff(base=5.0, cap=300.0, clock=monotonic)
        self._created_at: dict[str, float] = {}  # name -> monotonic of a successful create
        #: name -> first seen without a row (kept by the provider sync)
        self.orphans: dict[str, datetime] = {}
        #: rows may be provisioning or destroying
        self.work_pending = True
        #: pools an action touched during this pass (the loop clears it)
        self.touched: set[str] = set()

    @property
    def busy(self) -> frozenset[str]:
        """VM names with a provider call in flight."""
        return frozenset(self._inflight)

    # --- pool-level actions ------------------------------------------------------------

    async def apply(self, actions: list[Action], now: datetime) -> bool:
        """The executor of pool-level actions: True if any changed something."""
        changed = False
        for action in actions:
            match action:
                case ExpireLeases():
                    changed |= await self._expire_leases(now)
                case ExpireReservations(pools=pools):
                    changed |= await self._expire_reservations(now, pools)
                case DropQueue(pool=pool):
                    await self._inv.drop_queue(pool, now)
                    self.touched.add(pool)
                    changed = True
                case DestroyFree(pool=pool, reason=reason):
                    victims = await self._inv.free_of_pool(pool)
                    changed |= await self._destroy(
                        pool, victims, reason, now, ("ready", "provisioning")
                    )
                case Recycle(pool=pool, cutoff=cutoff, reason=reason):
                    old = await self._inv.ready_older_than(pool, cutoff)
                    changed |= await self._destroy(pool, old, reason, now, ("ready",))
                case ReplaceStale(pool=pool, spec_hash=current, state=state, limit=limit):
                    stale = await self._inv.stale_of_pool(pool, current, state, limit)
                    changed |= await self._destroy(pool, stale, action.reason, now, (state,))
                case Shrink(pool=pool, limit=limit, reason=reason):
                    if self._autoscale is not None:
                        old = await self._autoscale.oldest_ready(pool, limit)
                        changed |= await self._destroy(pool, old, reason, now, ("ready",))
                case SetAside(pool=pool, limit=limit):
                    for rid, instance in await self._inv.set_aside(pool, now, limit):
                        self._on_assigned(rid)
                        self.action("set aside", instance=instance, pool=pool, reservation=rid)
                        changed = True
                case Create():
                    changed |= await self._create_rows(action, now)
        return changed

    async def _destroy(
        self, pool: str, names: list[str], reason: str, now: datetime, states: tuple[str, ...]
    ) -> bool:
        done = await self._mark_destroying(names, reason, now, states)
        for instance in done:
            self.action("destroy", instance=instance, pool=pool, reason=reason)
        return bool(done)

    async def _create_rows(self, action: Create, now: datetime) -> bool:
        names = [new_instance_name(action.pool) for _ in range(action.count)]
        written = await self._inv.add_instances(
            action.pool, names, now, action.spec_hash, action.max_size
        )
        if len(written) < len(names):
            # Another leader's rows (an overlap during a handover): the
            # database's max_size guard refused ours.
            log.warning(
                "max_size guard refused new instances",
                pool=action.pool,
                asked=len(names),
                written=len(written),
            )
        if not written:
            return False
        self.work_pending = True
        cfg = self._pools.pool(action.pool)
        for name in written:
            if cfg is not None:
                self._maybe_create(name, cfg)
        self.action("provision", pool=action.pool, count=len(written), reason="refill")
        return True

    async def _mark_destroying(
        self, names: list[str], reason: str, now: datetime, from_states: tuple[str, ...]
    ) -> list[str]:
        if not names:
            return []
        done = await self._inv.mark_destroying(names, reason, now, from_states)
        self.work_pending |= bool(done)
        return done

    def action(self, action: str, **fields: Any) -> None:
        """Count and log one action (its pool is looked at again this pass)."""
        if "pool" in fields:
            self.touched.add(fields["pool"])
        self._metrics.reconcile_actions.labels(action.replace(" ", "_")).inc()
        log.info(action, **fields)

    async def _expire_leases(self, now: datetime) -> bool:
        ended = await self._inv.expire_leases(now)
        self.work_pending |= bool(ended)
        for lease in ended:
            held = (now - lease.leased_at).total_seconds()
            self._metrics.lease_duration.labels(lease.pool, "expired").observe(max(held, 0.0))
            self.action(
                "lease expired",
                instance=lease.instance,
                pool=lease.pool,
                service_tag=lease.service_tag,
                reason="lease expired",
            )
            audit.lease_ended(
                "ExpireLease",
                instance=lease.instance,
                pool=lease.pool,
                service_tag=lease.service_tag,
                owner=lease.principal,
                reason="expired",
            )
        return bool(ended)

    async def _expire_reservations(self, now: datetime, pools: tuple[str, ...] | None) -> bool:
        gone = await self._inv.expire_reservations(now, pools)
        for rid, pool, instance in gone:
            self.action(
                "reservation expired",
                reservation=rid,
                pool=pool,
                instance=instance,
                reason="not renewed within reservation_ttl",
            )
        return bool(gone)

    # --- row-level actions (rows next to the provider's VMs) ----------------------------

    async def apply_rows(
        self, actions: list[RowAction], pool_of: Mapping[str, str], now: datetime
    ) -> bool:
        """The executor of row-level actions."""
        ready: list[tuple[str, str]] = []
        failed: dict[str, list[str]] = {}
        changed = False
        for action in actions:
            match action:
                case MarkReady(name=name, zone=zone):
                    ready.append((name, zone))
                case BootFailed(name=name, reason=reason):
                    failed.setdefault(reason, []).append(name)
                case CreateVM(name=name, pool=pool):
                    cfg = self._pools.pool(pool)
                    if cfg is not None:
                        self._maybe_create(name, cfg)
                case DeleteVM(name=name, reason=reason):
                    self.orphans.pop(name, None)
                    self._spawn(name, self._delete(name, reason))
                case Forget(names=names):
                    await self._inv.forget(list(names))
                    for name in names:
                        self._created_at.pop(name, None)
                        self._attempts.forget(name)
                        log.debug("vm gone", instance=name)
                    changed = True
                case Vanished(names=names):
                    changed |= await self._vanished(list(names), now)
        if ready:
            for name, pool_name, created in await self._inv.mark_ready(ready, now):
                self.pool_backoff.succeeded(pool_name)
                booted = max((now - created).total_seconds(), 0.0)
                self._metrics.boot_duration.labels(pool_name).observe(booted)
                self._on_boot(pool_name, booted)
                self.action("ready", instance=name, pool=pool_name)
            changed = True
        delays: dict[str, float] = {}  # one backoff step per pool per pass, however many failed
        for reason, victims in failed.items():
            for name in await self._mark_destroying(victims, reason, now, ("provisioning",)):
                pool_name = pool_of[name]
                if pool_name not in delays:
                    delays[pool_name] = self.pool_backoff.failed(pool_name)
                self.action(
                    "boot failed",
                    instance=name,
                    pool=pool_name,
                    reason=reason,
                    pool_backoff_s=round(delays[pool_name], 1),
                )
                changed = True
        return changed

    async def _vanished(self, names: list[str], now: datetime) -> bool:
        for name, pool, state, tag, owner in await self._inv.vanished(names, now):
            if owner is not None:
                audit.lease_ended(
                    "VanishedLease",
                    instance=name,
                    pool=pool,
                    service_tag=tag,
                    owner=owner,
                    reason="vm vanished",
                )
            self.action(
                "vm vanished",
                instance=name,
                pool=pool,
                state=state,
                service_tag=tag or None,
                reason="lease ended: VM deleted outside vmpool"
                if state == "leased"
                else "VM deleted outside vmpool; will be replaced",
            )
        return True

    # --- provider calls, owned and bounded -----------------------------------------------

    async def drain_calls(self, timeout: float = 5.0) -> None:
        """Let in-flight provider calls finish (bounded), then cancel the rest."""
        tasks = list(self._inflight.values())
        if not tasks:
            return
        pending = set(tasks)
        if timeout > 0:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        if name in self._inflight:
            coro.close()
            return
        task = asyncio.create_task(coro, name=f"vm:{name}")
        self._inflight[name] = task
        task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        name = task.get_name().removeprefix("vm:")
        self._inflight.pop(name, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("provider call crashed", instance=name, error=repr(task.exception()))
        self._on_call_done()

    def _maybe_create(self, name: str, pool: PoolConfig) -> None:
        if name in self._inflight or self._attempts.blocked(name):
            return
        created = self._created_at.get(name)
        if created is not None and self._mono() - created < RECREATE_AFTER:
            return  # the backend may just not show it yet
        self._spawn(name, self._create(name, pool))

    async def _create(self, name: str, pool: PoolConfig) -> None:
        async with self._calls:
            if not self._leadership.may_call_provider(name, "create"):
                return
            try:
                await self._provider.create(name, pool)
            except Invalid as err:
                delay = self.pool_backoff.failed(pool.name)
                try:
                    await self._mark_destroying(
                        [name],
                        f"create rejected: {echo(str(err), 200)}",
                        self._clock(),
                        ("provisioning",),
                    )
                except StoreError as store_err:  # the boot timeout catches it later
                    log.warning("create rejected; row not updated", error=str(store_err))
                self.action(
                    "boot failed",
                    instance=name,
                    pool=pool.name,
                    reason=echo(str(err), 256),
                    pool_backoff_s=round(delay, 1),
                )
                return
            except ProviderError as err:
                delay = self._attempts.failed(name, at_least=err.retry_after or 0.0)
                log.warning(
                    "create failed",
                    instance=name,
                    pool=pool.name,
                    error=echo(str(err), 256),
                    retry_in_s=round(delay, 1),
                )
                return
            self._attempts.succeeded(name)
            self._created_at[name] = self._mono()
            self.action("create", instance=name, pool=pool.name)

    async def _delete(self, name: str, reason: str) -> None:
        async with self._calls:
            if self._attempts.blocked(name) or not self._leadership.may_call_provider(
                name, "delete"
            ):
                return
            try:
                await self._provider.delete(name)
            except ProviderError as err:
                delay = self._attempts.failed(name, at_least=err.retry_after or 0.0)
                log.warning(
                    "delete failed",
                    instance=name,
                    error=echo(str(err), 256),
                    retry_in_s=round(delay, 1),
                )
                return
            self._attempts.succeeded(name)
            self._on_deleted()
            self.action("delete", instance=name, reason=reason)
