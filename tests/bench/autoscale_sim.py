"""A discrete-event simulation of one pool (issue 24), no sleeps.

``simulate_adaptive`` drives the real code: vmpool.domain.autoscale.decide
sizes S and vmpool.domain.planner.plan_pool decides what to boot and destroy,
on every event, as the reconciler does on every pass. ``sweep_fixed`` gives
every fixed S at once for the same arrivals and boot times (the base-stock
policy the planner runs with a fixed min_ready, solved exactly with numpy;
valid while max_size and max_provisioning do not bind).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from vmpool.domain.autoscale import Demand, Learned, Settings, decide, observe_boot
from vmpool.domain.planner import Create, PoolObserved, PoolTarget, Shrink, plan_pool

TICK = 10.0  # seconds between decide() calls (the reconciler's full passes)
WALL = datetime(2026, 1, 5, tzinfo=UTC)  # plan_pool needs a wall time; nothing here expires


@dataclass(frozen=True, slots=True)
class Trace:
    arrivals: np.ndarray  # seconds, ascending
    durations: np.ndarray  # lease lengths, seconds
    boots: np.ndarray  # boot time of the VM booted for arrival i (and the initial ones after)
    burst: np.ndarray  # bool: arrival i belongs to a burst
    end: float
    start: float = 0.0  # measured from here (before: warm-up)


@dataclass(slots=True)
class Result:
    waited: np.ndarray  # bool per arrival
    waits: np.ndarray  # seconds per arrival (0 if served at once)
    idle_vm_h: float
    created: int
    peak_size: int
    peak_booting: int
    s_trace: list[tuple[float, int]]


def simulate_adaptive(
    trace: Trace,
    settings: Settings,
    *,
    max_size: int,
    max_provisioning: int,
) -> Result:
    arrivals = trace.arrivals.tolist()
    durations = trace.durations.tolist()
    boot_iter = iter(trace.boots.tolist())
    n = len(arrivals)
    demand = Demand(settings.slot, settings.window, since=0.0)
    learned = Learned()
    s = decide(settings, learned, demand, 0.0, max_size).s
    s_trace = [(0.0, s)]
    ready: deque[float] = deque([0.0] * s)  # ready since (oldest first)
    booting: list[tuple[float, float]] = []  # (done at, started at)
    leases: list[float] = []  # end times
    waiting: deque[int] = deque()  # arrival index
    waits = np.zeros(n)
    waited = np.zeros(n, dtype=bool)
    created = s if trace.start <= 0 else 0
    idle = 0.0
    last = 0.0
    peak_size = s
    peak_booting = 0
    next_tick = TICK
    i = 0
    inf = math.inf
    limited = True  # the last plan could not reach S (max_size, max_provisioning)
    while True:
        t_arr = arrivals[i] if i < n else inf
        t_boot = booting[0][0] if booting else inf
        t_end = leases[0] if leases else inf
        t = min(t_arr, t_boot, t_end, next_tick)
        if t > trace.end:
            break
        if t > trace.start:
            idle += len(ready) * (t - max(last, trace.start))
        last = t
        replan = False
        if t == t_boot:
            # ready + booting and the total are unchanged: nothing to plan
            done, started = heapq.heappop(booting)
            observe_boot(learned, done - started)
            if waiting:
                k = waiting.popleft()
                waits[k] = t - arrivals[k]
                heapq.heappush(leases, t + durations[k])
            else:
                ready.append(t)
        elif t == t_arr:
            demand.add(t)
            if ready:
                ready.pop()  # the newest: the oldest go first when S falls
                heapq.heappush(leases, t + durations[i])
            else:
                waited[i] = True
                waiting.append(i)
            i += 1
            replan = True
        elif t == t_end:
            heapq.heappop(leases)
            replan = limited  # room under max_size for a boot it held back
        else:
            next_tick += TICK
            demand.trim(t)
            new_s = decide(settings, learned, demand, t, max_size).s
            replan = new_s != s or limited
            s = new_s
            if s != s_trace[-1][1]:
                s_trace.append((t, s))
        if replan:
            observed = PoolObserved(
                "sim",
                ready=len(ready),
                ready_current=len(ready),
                provisioning=len(booting),
                provisioning_current=len(booting),
                leased=len(leases),
                waiting=len(waiting),
            )
            target = PoolTarget(
                "sim",
                min_ready=s,
                max_size=max_size,
                max_provisioning=max_provisioning,
                autoscaled=settings.act,
            )
            for action in plan_pool(observed, target, WALL):
                if isinstance(action, Create):
                    for _ in range(action.count):
                        heapq.heappush(booting, (t + next(boot_iter), t))
                    if t >= trace.start:
                        created += action.count
                elif isinstance(action, Shrink):
                    for _ in range(action.limit):
                        ready.popleft()
            limited = s + len(waiting) > len(ready) + len(booting)
        size = len(ready) + len(booting) + len(leases)
        peak_size = max(peak_size, size)
        peak_booting = max(peak_booting, len(booting))
    idle += len(ready) * (trace.end - last)
    return Result(waited, waits, idle / 3600, created, peak_size, peak_booting, s_trace)


@dataclass(slots=True)
class Sweep:
    """Every fixed S from 0 to ``len(share) - 1``."""

    share: np.ndarray
    burst_served: np.ndarray  # share of burst arrivals (from ``burst_from``) served at once
    idle_vm_h: np.ndarray
    created: np.ndarray
    peak_size: np.ndarray
    wait_p50: np.ndarray
    wait_p99: np.ndarray


def sweep_fixed(trace: Trace, burst_from: float = 0.0) -> Sweep:
    """Base stock with a fixed S (ready + booting = S + waiting, one boot per
    lease, S ready at the start): arrival i waits iff the boots in flight when
    it comes, N_i, are at least S; a waiter is served by the (N_i - S + 1)-th
    boot to finish after it came; ready(t) = max(0, S - booting(t))."""
    a = trace.arrivals
    n = len(a)
    c = a + trace.boots[:n]
    cs = np.sort(c)
    k = np.searchsorted(cs, a, side="right")
    in_flight = np.arange(n) - k
    top = int(in_flight.max()) + 2 if n else 1
    # time spent at each number of boots in flight
    times = np.concatenate([a, c, [trace.end]])
    steps = np.concatenate([np.ones(n), -np.ones(n), [0]])
    order = np.argsort(times, kind="stable")
    times, steps = np.minimum(times[order], trace.end), steps[order]
    level = np.cumsum(steps)
    spans = np.diff(np.concatenate([[trace.start], np.maximum(times, trace.start)]))
    prev = np.concatenate([[0.0], level[:-1]]).astype(int)
    at_level = np.bincount(prev, weights=spans, minlength=top + 1)
    # leases active at each arrival (counted from arrival: a wait shifts it by < a boot)
    ends = np.sort(a + trace.durations)
    active = np.arange(n) - np.searchsorted(ends, a, side="right")
    late = trace.burst & (a >= burst_from)
    m = a >= trace.start
    out = Sweep(*(np.zeros(top) for _ in range(7)))
    levels = np.arange(len(at_level))
    for s in range(top):
        waited = in_flight >= s
        out.share[s] = waited[m].mean() if m.any() else 0.0
        out.burst_served[s] = 1.0 - waited[late].mean() if late.any() else 1.0
        out.idle_vm_h[s] = float(np.sum(np.maximum(0, s - levels) * at_level)) / 3600
        out.created[s] = (s if trace.start <= 0 else 0) + int(m.sum())
        out.peak_size[s] = int(np.max(np.maximum(s, in_flight + 1) + active)) if n else s
        waited &= m
        if waited.any():
            idx = k[waited] + in_flight[waited] - s
            w = cs[np.minimum(idx, n - 1)] - a[waited]
            out.wait_p50[s], out.wait_p99[s] = np.percentile(w, [50, 99])
    return out
