"""The leader's side of adaptive warm pools (issue 24): reads the demand every
replica counted, asks vmpool.domain.autoscale for each pool's desired S, logs
and exports it, and keeps what was learned in PostgreSQL.

Statements: at start (as leader) one to load the state and one to read the
window's demand; then at most one read of new demand every 0.25 s while leases
come (for LAG seconds after news of one), else every IDLE_READ seconds, one batched write of changed
states (when S changed, else at most every SAVE_EVERY seconds) and a prune every PRUNE_EVERY. An
idle pool costs about 0.1 statement a second whatever its size."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from vmpool.config.schema import PoolConfig
from vmpool.domain.autoscale import (
    Decision,
    Demand,
    Learned,
    Settings,
    boot_mean,
    decide,
    observe_boot,
    record_peak,
    settings_of,
)
from vmpool.ops.metrics import Metrics
from vmpool.store.autoscale import AutoscaleStore

log = structlog.get_logger("vmpool.autoscale")

LAG = 5  # seconds: a replica's flush may land this late; re-read and add only what is new
IDLE_READ = 10.0  # seconds between reads of demand when no lease woke the leader
BUSY_READ = 0.25  # ... and after one did (replicas flush every 0.25 s)
SAVE_EVERY = 5.0  # seconds between writes of changed state
PRUNE_EVERY = 60.0


@dataclass(slots=True)
class _Pool:
    settings: Settings
    demand: Demand
    learned: Learned
    decision: Decision | None = None
    dirty: bool = False


class Autoscaler:
    def __init__(self, store: AutoscaleStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._pools: dict[str, _Pool] = {}
        self._loaded: dict[str, Learned] | None = None
        self._cursor: int | None = None  # demand read from this second on
        self._seen: dict[tuple[str, int], int] = {}  # (pool, second) -> count applied
        self._last_read = -math.inf
        self._last_news = -math.inf
        self._last_save = -math.inf
        self._s_changed = False
        self._last_prune = -math.inf
        self._boots: list[tuple[str, float]] = []  # seen by the executor since the pass

    @property
    def decisions(self) -> dict[str, Decision]:
        return {n: p.decision for n, p in self._pools.items() if p.decision is not None}

    def desired(self, pool: str) -> int | None:
        """The S the planner uses for ``pool`` (None: keep min_ready)."""
        p = self._pools.get(pool)
        if p is None or p.decision is None or not p.settings.act:
            return None
        return p.decision.s

    def boot_seen(self, pool: str, seconds: float) -> None:
        """A VM of ``pool`` became ready ``seconds`` after its row was written."""
        self._boots.append((pool, seconds))

    def stepped_down(self) -> None:
        """No longer leader: the next leadership starts from the database."""
        self._pools.clear()
        self._loaded = None
        self._cursor = None
        self._seen.clear()
        self._boots.clear()
        self._metrics.clear_autoscale()

    async def update(
        self,
        pools: Iterable[PoolConfig],
        now: datetime,
        news: bool,
        scope: Collection[str] | None = None,
    ) -> None:
        """One pass: ``news`` means a lease or reservation woke the pass;
        ``scope``: the pools an event-driven pass looks at (None: all)."""
        wanted = {p.name: p for p in pools if p.autoscale is not None}
        for gone in set(self._pools) - set(wanted):
            del self._pools[gone]
        if not wanted:
            return
        t = now.timestamp()
        if self._loaded is None:
            self._loaded = await self._store.load_states()
        for name, cfg in wanted.items():
            assert cfg.autoscale is not None
            settings = settings_of(cfg.autoscale, cfg.max_size)
            have = self._pools.get(name)
            if have is None or have.settings != settings:
                learned = have.learned if have else self._loaded.pop(name, Learned())
                keep = settings.window + settings.slot
                # What the window held before is read back from the database.
                demand = Demand(settings.slot, keep, since=t - settings.window)
                self._pools[name] = _Pool(settings, demand, learned)
        for pool, seconds in self._boots:
            if pool in self._pools:
                observe_boot(self._pools[pool].learned, seconds)
                self._pools[pool].dirty = True
        self._boots.clear()
        if news:
            self._last_news = t
        since_read = t - self._last_read
        busy = t - self._last_news <= LAG
        if self._cursor is None or since_read >= (BUSY_READ if busy else IDLE_READ):
            await self._read(t)
        for name, p in self._pools.items():
            if scope is not None and name not in scope and p.decision is not None:
                continue  # decided again at the next full pass
            p.demand.trim(t)
            before = p.learned.s, p.learned.hold, p.learned.raised_at
            decision = decide(p.settings, p.learned, p.demand, t, wanted[name].max_size)
            if (p.learned.s, p.learned.hold, p.learned.raised_at) != before:
                p.dirty = True
            if p.decision is None or decision.s != p.decision.s:
                self._log(name, p, decision)
                self._s_changed = True  # shown at once (PoolStats reads the stored one)
            if p.decision is None or _terms(decision) != _terms(p.decision):
                p.dirty = True  # shown by PoolStats
            p.decision = decision
            self._metrics.export_autoscale(
                name, decision.s, decision.rate, decision.boot_mean, decision.boot_quantile
            )
        due = self._s_changed or t - self._last_save >= SAVE_EVERY
        if due and any(p.dirty for p in self._pools.values()):
            self._s_changed = False
            self._last_save = t
            await self._store.save_states(
                {n: p.learned for n, p in self._pools.items()},
                {
                    n: _shown(p.decision, p.settings)
                    for n, p in self._pools.items()
                    if p.decision is not None
                },
            )
            for p in self._pools.values():
                p.dirty = False
        if t - self._last_prune >= PRUNE_EVERY and self._seen:
            self._last_prune = t
            longest = max(p.settings.window for p in self._pools.values())
            await self._store.prune_arrivals(int(t - longest) - LAG)

    async def _read(self, t: float) -> None:
        now = int(t)
        first = self._cursor is None
        if first:
            longest = max(p.settings.window for p in self._pools.values())
            since = now - int(longest) - 1
        else:
            assert self._cursor is not None
            since = self._cursor
        rows = await self._store.arrivals_since(since)
        self._last_read = t
        fresh: list[tuple[_Pool, int]] = []
        for pool, second, n in rows:
            p = self._pools.get(pool)
            key = (pool, second)
            new = n - self._seen.get(key, 0)
            self._seen[key] = n
            if p is not None and new > 0:
                p.demand.add(second + 0.5, new)
                p.dirty = True  # its profile may change
                fresh.append((p, second))
        for p, second in fresh:
            # The peak goes to the bin the calls came in, however late it is read.
            span = boot_mean(p.learned) + p.demand.slot
            end = second + 0.999
            record_peak(p.settings, p.learned, end, p.demand.counts_within(end, [span])[0])
        self._cursor = now - LAG
        self._seen = {k: v for k, v in self._seen.items() if k[1] >= self._cursor}

    def _log(self, pool: str, p: _Pool, d: Decision) -> None:
        log.info(
            "desired ready changed",
            pool=pool,
            desired_ready=d.s,
            previous=p.decision.s if p.decision is not None else None,
            reason=d.reason,
            arrivals_per_min=round(d.rate * 60, 2),
            boot_mean_s=round(d.boot_mean, 1),
            boot_p95_s=round(d.boot_quantile, 1),
            rate_term=d.rate_term,
            profile_term=d.profile_term,
            mode="act" if p.settings.act else "observe",
        )


def _terms(d: Decision) -> tuple[int, str, int, int]:
    return d.s, d.reason, d.rate_term, d.profile_term


def _shown(d: Decision, settings: Settings) -> dict[str, Any]:
    """A decision as PoolStats shows it (stored as JSON)."""
    return {
        "mode": "act" if settings.act else "observe",
        "desired_ready": d.s,
        "reason": d.reason,
        "arrivals_per_minute": round(d.rate * 60, 3),
        "boot_mean_seconds": round(d.boot_mean, 2),
        "boot_p95_seconds": round(d.boot_quantile, 2),
        "rate_term": d.rate_term,
        "profile_term": d.profile_term,
    }
