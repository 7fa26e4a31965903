"""The background loop (spec sections 5-6): expire, set aside, destroy, refill.

Only the leader runs it (see vmpool.control). Each step is one transaction;
provider calls run as owned tasks so a slow API never stalls a pass, and every
call is idempotent by VM name, so a crash anywhere is repaired by a later pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
import string
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from hashlib import sha256
from typing import Any

import structlog

from vmpool.config.schema import Config, PoolConfig
from vmpool.core.backoff import Backoff, Monotonic, Retry
from vmpool.core.clock import Clock
from vmpool.domain import pools as pool_rules
from vmpool.domain.planner import (
    VM,
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
    Observed,
    PoolObserved,
    PoolTarget,
    Recycle,
    ReplaceStale,
    Row,
    RowAction,
    SetAside,
    Vanished,
    orphans_seen,
    plan_pools,
    plan_rows,
    target_from_config,
)
from vmpool.ops.metrics import Metrics
from vmpool.providers.base import Provider, VMPhase
from vmpool.providers.errors import Invalid, ProviderError
from vmpool.services.catalog import PoolCatalog
from vmpool.store.errors import NotLeader, StoreError, StoreUnavailable
from vmpool.store.inventory import INSTANCE_STATES, Inventory, PoolSummary, Summary
from vmpool.store.pools import PoolStore

log = structlog.get_logger("vmpool.reconciler")

_ALPHABET = string.ascii_lowercase + string.digits
RESYNC = 30.0  # seconds between full comparisons of rows and VMs (drift)
RECREATE_AFTER = 30.0  # a provisioning row with no VM this long after create: create again
BUSY_PAUSE = 0.05  # between passes while there is work
MIN_GAP = 0.1  # at least this between pass starts: under a storm, batch, don't spin
PRUNE_EVERY = 60.0  # seconds between lease_history retention runs
PRUNE_BATCH = 1000  # rows per delete: short transactions, no long locks
PRUNE_BATCHES = 20  # per run at most; the next run goes on


_names = random.Random(secrets.randbits(128))  # unique enough; no syscall per name


@functools.cache
def _pool_tag(pool: str) -> str:
    return sha256(pool.encode()).hexdigest()[:4]


def new_instance_name(pool: str) -> str:
    """``vmp-<pool hash>-<random>``, a DNS label clients recognise by its prefix."""
    return f"vmp-{_pool_tag(pool)}-{''.join(_names.choices(_ALPHABET, k=8))}"


class Inbox:
    """Pools with news for the reconciler (None: every pool), put from any thread
    and taken by the reconciler's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: set[str | None] = set()

    def put(self, pool: str | None) -> None:
        with self._lock:
            self._items.add(pool)

    def take(self) -> set[str | None]:
        with self._lock:
            items, self._items = self._items, set()
        return items

    def __bool__(self) -> bool:
        return bool(self._items)


def _counts(pool: PoolSummary) -> pool_rules.Counts:
    return pool_rules.Counts(**{s: pool.counts.get(s, 0) for s in INSTANCE_STATES})


class Reconciler:
    def __init__(
        self,
        inventory: Inventory,
        provider: Provider,
        config: Config,
        clock: Clock,
        metrics: Metrics,
        on_assigned: Callable[[str], None],
        *,
        inbox: Inbox | None = None,
        concurrency: int = 32,
        monotonic: Monotonic = time.monotonic,
        on_fenced: Callable[[], None] = lambda: None,
        pool_store: PoolStore | None = None,
    ) -> None:
        self._inv = inventory
        self._pool_store = pool_store
        # Config pools and API pools (re-read each pass): what `pool(name)` answers.
        self._pools = PoolCatalog(config, pool_store)
        self._provider = provider
        self._config = config
        self._clock = clock
        self._mono = monotonic  # cadence, backoff and timers
        self._metrics = metrics
        self._on_assigned = on_assigned  # an instance was set aside for this reservation
        self._wake = asyncio.Event()
        self._inbox = inbox if inbox is not None else Inbox()  # news, from any thread
        self._calls = asyncio.Semaphore(concurrency)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._attempts = Backoff(base=2.0, cap=60.0, clock=monotonic)  # per VM name
        self._pool_backoff = Backoff(base=5.0, cap=300.0, clock=monotonic)  # per pool: boots fail
        self._targets: dict[str, PoolTarget] = {}  # as of the last plan
        self._on_fenced = on_fenced  # a write found we no longer lead
        # Set by run(); passes called directly (tests) lead.
        self._is_leader: Callable[[], bool] = lambda: True
        self._failing = Retry(base=0.2, cap=10.0)  # consecutive failed passes
        self._failing_delay = 0.0
        self._last_prune = -1e18
        #: False from a failed look at the provider until the next good one
        #: (read from the serving thread: a bool, atomic under the GIL).
        self.provider_usable = True
        self._created_at: dict[str, float] = {}  # name -> monotonic of a successful create
        self._orphans: dict[str, datetime] = {}  # name -> first seen without a row
        self._last_resync = -1e9
        self._provider_changed = True
        self._seen: set[str] = set()  # VM names in the previous observation
        # Event-driven passes look at the pools something happened in; a full
        # pass over every pool runs at least every reconcile_interval.
        self._dirty: set[str] = set()
        self._touched: set[str] = set()
        self._full_due = True
        self._last_full = -1e9
        self._work_pending = True  # rows may be provisioning or destroying
        self._exported: dict[str, tuple[float, ...]] = {}  # pool -> gauge values last set

    # --- driving ------------------------------------------------------------------

    def wake(self) -> None:
        """Ask for a pass soon, over every pool (cheap, sync; safe from callbacks)."""
        self._inbox.put(None)
        self._wake.set()

    def wake_pools(self, pools: Iterable[str]) -> None:
        """Ask for a pass soon over these pools (a lease or return there)."""
        for pool in pools:
            self._inbox.put(pool)
        self._wake.set()

    def _read_inbox(self) -> None:
        for pool in self._inbox.take():
            if pool is None:
                self._full_due = True
            else:
                self._dirty.add(pool)

    def provider_changed(self) -> None:
        self._provider_changed = True
        self._wake.set()

    async def run(self, stop: asyncio.Event, is_leader: Callable[[], bool]) -> None:
        """Passes while leading, until ``stop``; then the provider calls in flight
        finish or are cancelled before this returns (and leadership is released
        by the caller only after that)."""
        interval = self._config.reconcile_interval.total_seconds()
        self._is_leader = is_leader
        was_leading = False
        while not stop.is_set():
            busy = False
            leading = is_leader()
            self._metrics.leader.set(1 if leading else 0)
            if leading:
                started = self._mono()
                busy = await self._guarded_pass()
                pause = MIN_GAP - (self._mono() - started)
                if self._failing.attempt:
                    pause = max(pause, self._failing_delay)
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
            elif was_leading:
                await self._stepped_down()
            was_leading = leading
            if stop.is_set():
                break
            if leading:
                busy = busy or bool(self._inbox)  # news that came in during the pass
            else:
                self._inbox.take()  # the leader handles the news
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), BUSY_PAUSE if busy else interval)
            self._wake.clear()
        await self.drain_calls()

    async def _stepped_down(self) -> None:
        """No longer leader: stop our provider calls, forget what we saw."""
        await self.drain_calls(timeout=0)
        self._metrics.clear_pool_gauges()  # the new leader exports them
        self._exported.clear()
        self._seen.clear()
        self._last_resync = -1e9  # if we lead again, start from a full view
        self._full_due = True

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

    async def _guarded_pass(self) -> bool:
        """One pass; a failing one is logged (with its traceback if it is not a
        known outage) and the next pass runs, after a backoff while they fail."""
        start = time.perf_counter()
        try:
            changed = await self.pass_once()
            self._failing.reset()
            return changed
        except NotLeader as err:
            self._metrics.reconcile_errors.labels("fenced").inc()
            log.warning("reconcile pass stopped: leadership lost", error=str(err))
            self._on_fenced()
        except StoreUnavailable as err:
            self._metrics.reconcile_errors.labels("store").inc()
            self._failed_pass()
            log.warning("reconcile pass failed", error=str(err), retry_in_s=self._failing_delay)
        except ProviderError as err:
            self._metrics.reconcile_errors.labels("provider").inc()
            self._failed_pass()
            log.warning(
                "reconcile pass failed", error=str(err)[:256], retry_in_s=self._failing_delay
            )
        except Exception:  # a bug or an untranslated error: the next pass still runs
            self._metrics.reconcile_errors.labels("unexpected").inc()
            self._failed_pass()
            log.exception("reconcile pass failed", retry_in_s=self._failing_delay)
        finally:
            self._metrics.reconcile_duration.observe(time.perf_counter() - start)
        return False

    def _failed_pass(self) -> None:
        self._failing_delay = round(self._failing.next_delay(), 3)

    # --- one pass -------------------------------------------------------------------

    def targets(self, summary: Summary) -> dict[str, PoolTarget]:
        """What every pool should be (a pool not here is drained): config and API
        pools; a desired status other than RUNNING maps onto ``drained``."""
        out = {}
        for cfg in self._pools:
            seen = summary.pools.get(cfg.name)
            target = target_from_config(cfg, drained=seen is not None and seen.drained)
            out[cfg.name] = replace(target, spec_hash=self._pools.spec_hash(cfg))
        return out

    def _observed(self, summary: Summary, targets: Mapping[str, PoolTarget]) -> Observed:
        pools = {}
        for name, p in summary.pools.items():
            current = targets[name].spec_hash if name in targets else None
            pools[name] = PoolObserved(
                name,
                ready=p.counts["ready"],
                ready_current=p.by_hash.get(("ready", current), 0) if current is not None else 0,
                provisioning=p.counts["provisioning"],
                provisioning_current=p.by_hash.get(("provisioning", current), 0)
                if current is not None
                else 0,
                reserved=p.counts["reserved"],
                leased=p.counts["leased"],
                destroying=p.counts["destroying"],
                waiting=p.waiting,
                set_aside=p.set_aside,
                oldest_ready=p.oldest_ready,
                next_reservation_expiry=p.next_reservation_expiry,
            )
        backoff = {}
        for name in targets:
            until = self._pool_backoff.until(name)
            if until is not None:
                backoff[name] = until
        return Observed(pools, summary.next_lease_expiry, summary.complete, backoff)

    def _plan(self, summary: Summary, now: datetime) -> list[Action]:
        targets = self.targets(summary)
        self._targets = targets
        return plan_pools(self._observed(summary, targets), targets, now, self._mono())

    async def pass_once(self) -> bool:
        """One reconcile pass; True if it changed anything (another pass soon)."""
        now = self._clock()
        self._read_inbox()
        interval = self._config.reconcile_interval.total_seconds()
        full = self._full_due or self._mono() - self._last_full >= interval
        scope = None if full else sorted(self._dirty)
        self._dirty.clear()
        self._touched.clear()
        if full:
            self._full_due = False
            self._last_full = self._mono()
        await self._pools.refresh()
        summary = await self._inv.summary(scope)
        self._export(summary)
        actions = self._plan(summary, now)
        # First what ends or destroys, then the provider's news; sizing is
        # planned again from fresh counts if any of that changed something.
        changed = await self._apply(
            [a for a in actions if not isinstance(a, SetAside | Create)], now
        )
        if self._needs_provider(summary):
            changed |= await self._sync_with_provider(now)
        sizing: tuple[type, ...] = (SetAside, Create)
        if changed:
            rescope = None if scope is None else sorted({*scope, *self._touched})
            summary = await self._inv.summary(rescope)
            self._export(summary)
            actions = self._plan(summary, now)
            sizing = (ReplaceStale, SetAside, Create)
        changed |= await self._apply([a for a in actions if isinstance(a, sizing)], now)
        if self._mono() - self._last_prune >= PRUNE_EVERY:
            self._last_prune = self._mono()
            await self._prune_history(now)
        changed |= await self._statuses(summary)
        return changed

    async def _prune_history(self, now: datetime) -> None:
        """lease_history retention, in batches (RESERVATION_LOOKUP reads it)."""
        before = now - self._config.reconciler.lease_history_retention
        total = 0
        for _ in range(PRUNE_BATCHES):
            n = await self._inv.prune_history(before, PRUNE_BATCH)
            total += n
            if n < PRUNE_BATCH:
                break
        if total:
            self._metrics.reconcile_actions.labels("history pruned").inc(total)
            log.info("history pruned", rows=total, ended_before=before.isoformat())

    async def _statuses(self, summary: Summary) -> bool:
        """Pool statuses the counts reached (pool-api.md section 3): RUNNING once
        min_ready is ready; a deleted pool with no VM left disappears."""
        if self._pool_store is None:
            return False
        reached = []
        deleted = False
        if summary.complete:
            self._export_statuses(summary)
        for name, pool in summary.pools.items():
            deleted |= pool.desired_status == pool_rules.DELETED and not any(pool.counts.values())
            cfg = self._pools.pool(name)
            if cfg is None or pool.drained or pool.reached_running:
                continue
            want = pool_rules.effective_min_ready(cfg.min_ready, cfg.max_size, _counts(pool))
            if pool.counts["ready"] + pool.counts["reserved"] >= want:
                reached.append(name)
        if reached:
            await self._inv.mark_reached_running(reached)
        gone = await self._inv.forget_deleted_pools() if deleted else []
        for name in gone:
            self._action("pool deleted", pool=name, reason="DeletePool, no VM left")
        return bool(gone)

    def _export_statuses(self, summary: Summary) -> None:
        """vmpool_pools{status} and vmpool_pools_reconciling, from a full summary."""
        by_status = dict.fromkeys(pool_rules.CURRENT_STATUSES, 0)
        reconciling = 0
        for name, pool in summary.pools.items():
            cfg = self._pools.pool(name)
            if cfg is None and pool.desired_status == pool_rules.RUNNING:
                continue  # removed from the config: not a pool any more
            counts = _counts(pool)
            if cfg is not None:
                current = self._pools.spec_hash(cfg)
                fresh = sum(pool.by_hash.get((st, current), 0) for st in ("ready", "provisioning"))
                counts = replace(counts, stale_free=counts.ready + counts.provisioning - fresh)
            status = pool_rules.pool_status(
                pool.desired_status,
                counts,
                min_ready=cfg.min_ready if cfg is not None else 0,
                max_size=cfg.max_size if cfg is not None else 0,
                reached_running=pool.reached_running,
            )
            by_status[status.current] += 1
            reconciling += status.reconciling
        for status_name, n in by_status.items():
            self._metrics.pools.labels(status_name).set(n)
        self._metrics.pools_reconciling.set(reconciling)

    async def _apply(self, actions: list[Action], now: datetime) -> bool:
        """The executor of pool-level actions: True if any changed something."""
        changed = False
        for action in actions:
            match action:
                case ExpireLeases():
                    changed |= await self._expire_leases(now)
                case ExpireReservations():
                    changed |= await self._expire_reservations(now)
                case DropQueue(pool=pool):
                    await self._inv.drop_queue(pool, now)
                    self._touched.add(pool)
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
                case SetAside(pool=pool, limit=limit):
                    for rid, instance in await self._inv.set_aside(pool, now, limit):
                        self._on_assigned(rid)
                        self._action("set aside", instance=instance, pool=pool, reservation=rid)
                        changed = True
                case Create():
                    changed |= await self._create_rows(action, now)
        return changed

    async def _destroy(
        self, pool: str, names: list[str], reason: str, now: datetime, states: tuple[str, ...]
    ) -> bool:
        done = await self._mark_destroying(names, reason, now, states)
        for instance in done:
            self._action("destroy", instance=instance, pool=pool, reason=reason)
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
        self._work_pending = True
        cfg = self._pools.pool(action.pool)
        for name in written:
            if cfg is not None:
                self._maybe_create(name, cfg)
        self._action("provision", pool=action.pool, count=len(written), reason="refill")
        return True

    def _export(self, summary: Summary) -> None:
        now = self._clock()
        for name, pool in summary.pools.items():
            age = (now - pool.oldest_enqueued).total_seconds() if pool.oldest_enqueued else 0.0
            cfg = self._pools.pool(name)  # config and API pools alike
            sizing = (cfg.min_ready, cfg.max_size) if cfg is not None else (-1, -1)
            values = (*(pool.counts.get(s, 0) for s in INSTANCE_STATES), pool.queued, age, *sizing)
            if self._exported.get(name) == values:
                continue  # unchanged: with many pools, setting gauges is most of a pass
            self._exported[name] = values
            for state in INSTANCE_STATES:
                self._metrics.instances.labels(name, state).set(pool.counts.get(state, 0))
            self._metrics.reservations_queued.labels(name).set(pool.queued)
            self._metrics.reservation_oldest_age.labels(name).set(max(age, 0.0))
            if cfg is not None:
                self._metrics.pool_min_ready.labels(name).set(sizing[0])
                self._metrics.pool_max_size.labels(name).set(sizing[1])

    async def _mark_destroying(
        self, names: list[str], reason: str, now: datetime, from_states: tuple[str, ...]
    ) -> list[str]:
        if not names:
            return []
        done = await self._inv.mark_destroying(names, reason, now, from_states)
        self._work_pending |= bool(done)
        return done

    def _action(self, action: str, **fields: Any) -> None:
        if "pool" in fields:
            self._touched.add(fields["pool"])
        self._metrics.reconcile_actions.labels(action.replace(" ", "_")).inc()
        log.info(action, **fields)

    async def _expire_leases(self, now: datetime) -> bool:
        ended = await self._inv.expire_leases(now)
        self._work_pending |= bool(ended)
        for lease in ended:
            held = (now - lease.leased_at).total_seconds()
            self._metrics.lease_duration.labels(lease.pool, "expired").observe(max(held, 0.0))
            self._action(
                "lease expired",
                instance=lease.instance,
                pool=lease.pool,
                service_tag=lease.service_tag,
                reason="lease expired",
            )
        return bool(ended)

    async def _expire_reservations(self, now: datetime) -> bool:
        gone = await self._inv.expire_reservations(now)
        for rid, pool, instance in gone:
            self._action(
                "reservation expired",
                reservation=rid,
                pool=pool,
                instance=instance,
                reason="not renewed within reservation_ttl",
            )
        return bool(gone)

    def _resync_due(self) -> bool:
        # Orphans are deleted after orphan_grace: compare often enough for that.
        every = min(RESYNC, max(1.0, self._provider.orphan_grace.total_seconds() / 2))
        return self._mono() - self._last_resync >= every

    def resync_soon(self) -> None:
        """Compare every row with every VM on the next pass (drift, orphans)."""
        self._last_resync = -1e18
        self._wake.set()

    def _needs_provider(self, summary: Summary) -> bool:
        busy = self._work_pending or any(
            p.counts["provisioning"] or p.counts["destroying"] for p in summary.pools.values()
        )
        return busy or self._resync_due() or self._provider_changed

    async def _sync_with_provider(self, now: datetime) -> bool:
        """Compare rows with VMs: boots done or failed, deletions confirmed, drift."""
        full = self._resync_due()
        try:
            statuses = await self._provider.observe(full=full)
        except ProviderError:
            self.provider_usable = False  # health: vmpool.provider NOT_SERVING
            raise
        self.provider_usable = True
        if statuses is None:
            return False  # the provider's view is not complete yet
        self._provider_changed = False
        vms = {
            name: VM(
                name,
                ready=vm.phase is VMPhase.READY,
                failed=vm.phase is VMPhase.FAILED,
                deleting=vm.deleting,
                zone=vm.zone,
                reason=vm.reason,
            )
            for name, vm in statuses.items()
        }
        # VMs that were there last time and are not now: gone behind our back,
        # or deletions we asked for. Checked at once, not at the next resync.
        disappeared = self._seen - vms.keys()
        self._seen = set(vms)
        rows = await self._inv.work_rows(everything=full)
        self._work_pending = any(r.state in ("provisioning", "destroying") for r in rows)
        if full:
            self._last_resync = self._mono()
            self._orphans = orphans_seen((r.name for r in rows), vms, self._orphans, now)
        elif disappeared:
            rows += await self._inv.rows_named(sorted(disappeared))
        pool_of = {r.name: r.pool for r in rows}
        actions = plan_rows(
            [
                Row(r.name, r.pool, r.state, r.created_at, r.spec_hash, r.destroy_reason)
                for r in rows
            ],
            vms,
            self._targets,
            now,
            busy=frozenset(self._inflight),
            orphans_since=self._orphans if full else None,
            orphan_grace=self._provider.orphan_grace,
        )
        return await self._apply_rows(actions, pool_of, now)

    async def _apply_rows(
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
                    self._orphans.pop(name, None)
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
                self._pool_backoff.succeeded(pool_name)
                self._metrics.boot_duration.labels(pool_name).observe(
                    max((now - created).total_seconds(), 0.0)
                )
                self._action("ready", instance=name, pool=pool_name)
            changed = True
        delays: dict[str, float] = {}  # one backoff step per pool per pass, however many failed
        for reason, victims in failed.items():
            for name in await self._mark_destroying(victims, reason, now, ("provisioning",)):
                pool_name = pool_of[name]
                if pool_name not in delays:
                    delays[pool_name] = self._pool_backoff.failed(pool_name)
                self._action(
                    "boot failed",
                    instance=name,
                    pool=pool_name,
                    reason=reason,
                    pool_backoff_s=round(delays[pool_name], 1),
                )
                changed = True
        return changed

    async def _vanished(self, names: list[str], now: datetime) -> bool:
        for name, pool, state, tag in await self._inv.vanished(names, now):
            self._action(
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
        self._wake.set()

    def _maybe_create(self, name: str, pool: PoolConfig) -> None:
        if name in self._inflight or self._attempts.blocked(name):
            return
        created = self._created_at.get(name)
        if created is not None and self._mono() - created < RECREATE_AFTER:
            return  # the backend may just not show it yet
        self._spawn(name, self._create(name, pool))

    def _may_call_provider(self, name: str, what: str) -> bool:
        """Re-checked just before each provider call: a leader that was frozen
        (SIGSTOP, a long GC or VM pause) past its trusted term must not act on
        what it decided before, since a new leader may already be doing it."""
        if self._is_leader():
            return True
        log.info("provider call skipped: leadership not held", instance=name, call=what)
        return False

    async def _create(self, name: str, pool: PoolConfig) -> None:
        async with self._calls:
            if not self._may_call_provider(name, "create"):
                return
            try:
                await self._provider.create(name, pool)
            except Invalid as err:
                delay = self._pool_backoff.failed(pool.name)
                try:
                    await self._mark_destroying(
                        [name],
                        f"create rejected: {str(err)[:200]}",
                        self._clock(),
                        ("provisioning",),
                    )
                except StoreError as store_err:  # the boot timeout catches it later
                    log.warning("create rejected; row not updated", error=str(store_err))
                self._action(
                    "boot failed",
                    instance=name,
                    pool=pool.name,
                    reason=str(err)[:256],
                    pool_backoff_s=round(delay, 1),
                )
                return
            except ProviderError as err:
                delay = self._attempts.failed(name, at_least=err.retry_after or 0.0)
                log.warning(
                    "create failed",
                    instance=name,
                    pool=pool.name,
                    error=str(err)[:256],
                    retry_in_s=round(delay, 1),
                )
                return
            self._attempts.succeeded(name)
            self._created_at[name] = self._mono()
            self._action("create", instance=name, pool=pool.name)

    async def _delete(self, name: str, reason: str) -> None:
        async with self._calls:
            if self._attempts.blocked(name) or not self._may_call_provider(name, "delete"):
                return
            try:
                await self._provider.delete(name)
            except ProviderError as err:
                delay = self._attempts.failed(name, at_least=err.retry_after or 0.0)
                log.warning(
                    "delete failed",
                    instance=name,
                    error=str(err)[:256],
                    retry_in_s=round(delay, 1),
                )
                return
            self._attempts.succeeded(name)
            self._provider_changed = True
            self._action("delete", instance=name, reason=reason)
