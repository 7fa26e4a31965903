"""The reconciler's loop (spec sections 5-6): while leading, one pass after
another: read the pools, plan (vmpool.domain.planner, pure), apply
(vmpool.control.executor), compare rows with the provider's VMs
(vmpool.control.provider_sync), prune old history (vmpool.control.housekeeping).

Only the leader runs passes (vmpool.control.leadership). Passes are woken by
news (the Inbox: a lease or return in a pool, a provider event) and run over
every pool at least every reconcile_interval; a failing pass is retried with
a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime

import structlog

from vmpool.config.schema import Config, PoolConfig
from vmpool.control.autoscaler import Autoscaler
from vmpool.control.doorbell import Inbox
from vmpool.control.executor import Executor
from vmpool.control.gauges import PoolGauges, counts_of
from vmpool.control.housekeeping import Housekeeping
from vmpool.control.leadership import Leadership
from vmpool.control.provider_sync import ProviderSync
from vmpool.core.backoff import Monotonic, Retry
from vmpool.core.clock import Clock
from vmpool.core.echo import echo
from vmpool.domain import pools as pool_rules
from vmpool.domain.autoscale import least_ready
from vmpool.domain.planner import (
    Action,
    Create,
    Observed,
    PoolObserved,
    PoolTarget,
    ReplaceStale,
    SetAside,
    plan_pools,
    reservations_held,
    target_from_config,
)
from vmpool.ops.metrics import Metrics
from vmpool.providers.base import Provider
from vmpool.providers.errors import ProviderError
from vmpool.services.catalog import PoolCatalog
from vmpool.store.autoscale import AutoscaleStore
from vmpool.store.errors import NotLeader, StoreUnavailable
from vmpool.store.inventory import Inventory, Summary
from vmpool.store.pools import PoolStore

log = structlog.get_logger("vmpool.reconciler")

BUSY_PAUSE = 0.05  # between passes while there is work
MIN_GAP = 0.1  # at least this between pass starts: under a storm, batch, don't spin


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
        autoscale_store: AutoscaleStore | None = None,
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
        self._wake = asyncio.Event()
        self._targets_of: dict[tuple[str, bool], tuple[PoolConfig, PoolTarget]] = {}
        self._inbox = inbox if inbox is not None else Inbox()  # news, from any thread
        self._leadership = Leadership(metrics, on_fenced)
        self._gauges = PoolGauges(metrics, self._pools, clock)
        self._exec = Executor(
            inventory,
            provider,
            self._pools,
            clock,
            monotonic,
            metrics,
            self._leadership,
            on_assigned=on_assigned,
            on_call_done=self._wake.set,
            on_deleted=self._vm_deleted,
            concurrency=concurrency,
            autoscale=autoscale_store,
            on_boot=self._boot_seen,
        )
        #: pools with an autoscale block size their buffer from demand (issue 24)
        self.autoscaler = Autoscaler(autoscale_store, metrics) if autoscale_store else None
        self._targets: dict[str, PoolTarget] = {}  # as of the last plan
        self._failing = Retry(base=0.2, cap=10.0)  # consecutive failed passes
        self._failing_delay = 0.0
        self._sync = ProviderSync(inventory, provider, self._exec, monotonic)
        self._housekeeping = Housekeeping(inventory, config, metrics, monotonic)
        # Event-driven passes look at the pools something happened in; a full
        # pass over every pool runs at least every reconcile_interval.
        self._dirty: set[str] = set()
        self._full_due = True
        self._last_full = -1e9

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
        self._sync.changed = True
        self._wake.set()

    def _vm_deleted(self) -> None:
        self._sync.changed = True

    def resync_soon(self) -> None:
        """Compare every row with every VM on the next pass (drift, orphans)."""
        self._sync.resync_soon()
        self._wake.set()

    @property
    def provider_usable(self) -> bool:
        """False from a failed look at the provider until the next good one
        (read from the serving thread: a bool, atomic under the GIL)."""
        return self._sync.usable

    async def run(self, stop: asyncio.Event, is_leader: Callable[[], bool]) -> None:
        """Passes while leading, until ``stop``; then the provider calls in flight
        finish or are cancelled before this returns (and leadership is released
        by the caller only after that)."""
        interval = self._config.reconcile_interval.total_seconds()
        self._leadership.is_leader = is_leader
        while not stop.is_set():
            busy = False
            leading, stepped_down = self._leadership.poll()
            if leading:
                started = self._mono()
                busy = await self._guarded_pass()
                pause = MIN_GAP - (self._mono() - started)
                if self._failing.attempt:
                    pause = max(pause, self._failing_delay)
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
            elif stepped_down:
                await self._stepped_down()
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

    def _boot_seen(self, pool: str, seconds: float) -> None:
        if self.autoscaler is not None:
            self.autoscaler.boot_seen(pool, seconds)

    async def _stepped_down(self) -> None:
        """No longer leader: stop our provider calls, forget what we saw."""
        await self.drain_calls(timeout=0)
        if self.autoscaler is not None:
            self.autoscaler.stepped_down()
        self._gauges.clear()
        self._sync.forget()  # if we lead again, start from a full view
        self._full_due = True

    async def drain_calls(self, timeout: float = 5.0) -> None:
        """Let in-flight provider calls finish (bounded), then cancel the rest."""
        await self._exec.drain_calls(timeout)

    async def _guarded_pass(self) -> bool:
        """One pass; a failing one is logged (with its traceback if it is not a
        known outage) and the next pass runs, after a backoff while they fail."""
        start = time.perf_counter()
        try:
            changed = await self.pass_once()
            self._failing.reset()
            return changed
        except NotLeader as err:
            self._leadership.fenced(err)
        except StoreUnavailable as err:
            self._metrics.reconcile_errors.labels("store").inc()
            self._failed_pass()
            log.warning("reconcile pass failed", error=str(err), retry_in_s=self._failing_delay)
        except ProviderError as err:
            self._metrics.reconcile_errors.labels("provider").inc()
            self._failed_pass()
            log.warning(
                "reconcile pass failed", error=echo(str(err), 256), retry_in_s=self._failing_delay
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
            drained = seen is not None and seen.drained
            # Built once per PoolConfig object (API pools get new ones on refresh):
            # with hundreds of pools, rebuilding every target took a pass's time.
            cached = self._targets_of.get((cfg.name, drained))
            if cached is None or cached[0] is not cfg:
                built = replace(
                    target_from_config(cfg, drained=drained), spec_hash=self._pools.spec_hash(cfg)
                )
                cached = self._targets_of[(cfg.name, drained)] = (cfg, built)
            target = cached[1]
            desired = self.autoscaler.desired(cfg.name) if self.autoscaler else None
            if desired is not None:
                target = replace(target, min_ready=desired, autoscaled=True)
            out[cfg.name] = target
        return out

    def _plan(self, summary: Summary, now: datetime) -> list[Action]:
        targets = self.targets(summary)
        self._targets = targets
        backoff = {}
        for name in targets:
            until = self._exec.pool_backoff.until(name)
            if until is not None:
                backoff[name] = until
        mono = self._mono()
        led_for = mono - self._leadership.leading_since(mono)
        held = reservations_held(led_for, {cfg.name: cfg.reservation_ttl for cfg in self._pools})
        return plan_pools(observed(summary, targets, backoff), targets, now, mono, held=held)

    async def pass_once(self) -> bool:
        """One reconcile pass; True if it changed anything (another pass soon)."""
        now = self._clock()
        self._read_inbox()
        interval = self._config.reconcile_interval.total_seconds()
        full = self._full_due or self._mono() - self._last_full >= interval
        scope = None if full else sorted(self._dirty)
        news = bool(self._dirty)  # a lease or reservation somewhere: demand to read
        self._dirty.clear()
        self._exec.touched.clear()
        if full:
            self._full_due = False
            self._last_full = self._mono()
        await self._pools.refresh()
        if self.autoscaler is not None:
            await self.autoscaler.update(self._pools, now, news, scope)
        summary = await self._inv.summary(scope)
        self._gauges.export(summary)
        actions = self._plan(summary, now)
        # First what ends or destroys, then the provider's news; sizing is
        # planned again from fresh counts if any of that changed something.
        changed = await self._exec.apply(
            [a for a in actions if not isinstance(a, SetAside | Create)], now
        )
        if self._sync.needed(summary):
            changed |= await self._sync.sync(now, self._targets)
        sizing: tuple[type, ...] = (SetAside, Create)
        if changed:
            rescope = None if scope is None else sorted({*scope, *self._exec.touched})
            summary = await self._inv.summary(rescope)
            self._gauges.export(summary)
            actions = self._plan(summary, now)
            sizing = (ReplaceStale, SetAside, Create)
        changed |= await self._exec.apply([a for a in actions if isinstance(a, sizing)], now)
        await self._housekeeping.maybe_prune(now)
        changed |= await self._statuses(summary)
        return changed

    async def _statuses(self, summary: Summary) -> bool:
        """Pool statuses the counts reached (pool-api.md section 3): RUNNING once
        min_ready is ready; a deleted pool with no VM left disappears."""
        if self._pool_store is None:
            return False
        reached = []
        deleted = False
        if summary.complete:
            self._gauges.export_statuses(summary)
        for name, pool in summary.pools.items():
            deleted |= pool.desired_status == pool_rules.DELETED and not any(pool.counts.values())
            cfg = self._pools.pool(name)
            if cfg is None or pool.drained or pool.reached_running:
                continue
            want = pool_rules.effective_min_ready(least_ready(cfg), cfg.max_size, counts_of(pool))
            if pool.counts["ready"] + pool.counts["reserved"] >= want:
                reached.append(name)
        if reached:
            await self._inv.mark_reached_running(reached)
        gone = await self._inv.forget_deleted_pools() if deleted else []
        for name in gone:
            self._exec.action("pool deleted", pool=name, reason="DeletePool, no VM left")
        return bool(gone)


def observed(
    summary: Summary, targets: Mapping[str, PoolTarget], backoff: dict[str, float]
) -> Observed:
    """The planner's view of a store summary: counts per pool, and of them
    those of each pool's current spec."""
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
    return Observed(pools, summary.next_lease_expiry, summary.complete, backoff)
