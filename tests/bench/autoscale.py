"""`python -m tests.bench --autoscale` (issue 24): adaptive warm pools against every
fixed ``min_ready``, in simulated time (tests/bench/autoscale_sim.py), 5 seeds per
trace. Prints the results and PASS/FAIL per target, writes
bench-results/autoscale.json, one plot per trace (bench-results/autoscale-*.png)
and the table in docs/performance.md between the ``autoscale-results`` markers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.bench import autoscale_report
from tests.bench.autoscale_sim import Sweep, Trace, simulate_adaptive, sweep_fixed
from vmpool.domain.autoscale import Settings, poisson_quantile

SEEDS = (1, 2, 3, 4, 5)
DOC = Path("docs/performance.md")
BOOT = 60.0  # mean boot time, seconds (±20 % uniform)
MEDIAN_LEASE = 600.0
LEASE_SIGMA = 1.0  # lognormal shape: mean lease 16.5 min
LEASE_CAP = 4 * 3600.0
MAX_SIZE = 1000  # does not bind (peak size is printed)
MAX_PROVISIONING = 1000  # does not bind (peak boots in flight is printed)
TARGET = 0.01
HOUR = 3600.0
DAY = 24 * HOUR
BURST = 40
WARM = HOUR  # not measured
ADAPTIVE = Settings(
    floor=1,
    ceiling=MAX_SIZE,
    target=TARGET,
    delay=600,
    learn_daily=True,
    period=DAY,
    bin=300,
    window=1800,
)

Rate = Callable[[np.ndarray], np.ndarray]  # λL at times t (arrivals per mean boot time)


def _poisson(rng: np.random.Generator, rate: Rate, end: float, peak: float) -> np.ndarray:
    """Arrivals of a Poisson process with rate(t)/BOOT per second (thinning)."""
    lam = peak / BOOT
    n = rng.poisson(lam * end * 1.05) + 10
    t = np.cumsum(rng.exponential(1 / lam, n))
    t = t[t < end]
    keep = rng.random(len(t)) < rate(t) / peak
    return t[keep]


def _bursts(rng: np.random.Generator, starts: list[float]) -> np.ndarray:
    return np.concatenate([s + np.sort(rng.random(BURST)) * 60 for s in starts])


def make_trace(name: str, seed: int) -> Trace:
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    burst: list[float] = []
    if name.startswith("steady"):
        lam_l = float(name.removeprefix("steady-"))
        end = max(5200 / (lam_l / BOOT), 4 * HOUR)
        t = _poisson(rng, lambda t: np.full_like(t, lam_l), end, lam_l)
    elif name == "ramp":
        end = 6.2 * HOUR

        def ramp(t: np.ndarray) -> np.ndarray:
            return np.clip(1 + 19 * (t - HOUR) / (2 * HOUR), 1, 20)

        t = _poisson(rng, ramp, end, 20)
    elif name == "night":
        end = 14 * HOUR
        t = _poisson(rng, lambda t: np.where((t > 3 * HOUR) & (t < 11 * HOUR), 0.5, 20), end, 20)
    elif name == "diurnal":
        end = 7 * DAY  # Monday 00:00 to Sunday 24:00 UTC

        def diurnal(t: np.ndarray) -> np.ndarray:
            day = ((t % DAY) >= 8 * HOUR) & ((t % DAY) < 20 * HOUR)
            weekend = (t // DAY) >= 5
            return np.where(day, 20.0, 1.0) * np.where(weekend, 0.25, 1.0)

        t = _poisson(rng, diurnal, end, 20)
    elif name.startswith("daily-burst"):
        end = 7 * DAY
        t = _poisson(rng, lambda t: np.full_like(t, 0.5), end, 0.5)
        burst = [d * DAY + 9 * HOUR for d in range(7)]
    elif name == "random-bursts":
        end = 7 * DAY
        t = _poisson(rng, lambda t: np.full_like(t, 0.5), end, 0.5)
        burst = sorted(float(x) for x in rng.uniform(HOUR, end - HOUR, 7))
    else:
        raise ValueError(name)
    b = _bursts(rng, burst) if burst else np.zeros(0)
    # A warm-up hour at the starting rate, not measured: every policy starts warm.
    first = float(np.sum(t < HOUR)) / HOUR if len(t) else 0.0
    warm = np.sort(rng.uniform(0, WARM, rng.poisson(first * WARM)))
    t, b, end = t + WARM, b + WARM, end + WARM
    arrivals = np.concatenate([warm, t, b])
    is_burst = np.concatenate([np.zeros(len(warm) + len(t), bool), np.ones(len(b), bool)])
    order = np.argsort(arrivals, kind="stable")
    arrivals, is_burst = arrivals[order], is_burst[order]
    n = len(arrivals)
    durations = np.minimum(MEDIAN_LEASE * np.exp(LEASE_SIGMA * rng.standard_normal(n)), LEASE_CAP)
    boots = BOOT * rng.uniform(0.8, 1.2, n + 20 * n + 1000)  # adaptive pools boot more
    return Trace(arrivals, durations, boots, is_burst, end, WARM)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    kind: str  # steady | changing | burst | random
    max_size: int = MAX_SIZE


CASES = [
    Case("steady-1", "steady"),
    Case("steady-10", "steady"),
    Case("steady-30", "steady"),
    Case("ramp", "changing"),
    Case("night", "changing"),
    Case("diurnal", "changing"),
    Case("daily-burst", "burst"),
    Case("daily-burst-max30", "burst", max_size=30),
    Case("random-bursts", "random"),
]


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def _policy_row(waited: np.ndarray, waits: np.ndarray, idle: float, created: int, peak: int):  # type: ignore[no-untyped-def]
    w = waits[waited]
    p50, p99 = np.percentile(w, [50, 99]) if len(w) else (0.0, 0.0)
    return {
        "share_waited": float(waited.mean()) if len(waited) else 0.0,
        "wait_p50_s": float(p50),
        "wait_p99_s": float(p99),
        "idle_vm_h": idle,
        "created": created,
        "peak_size": peak,
    }


def run_case(case: Case) -> dict[str, Any]:
    adaptive: list[dict[str, Any]] = []
    sweeps: list[Sweep] = []
    leases = []
    burst_from = WARM + 2 * DAY  # day 3 on
    settings = Settings(**{**_fields(ADAPTIVE), "ceiling": min(ADAPTIVE.ceiling, case.max_size)})
    for seed in SEEDS:
        trace = make_trace(case.name, seed)
        leases.append(int(np.sum(trace.arrivals >= trace.start)))
        res = simulate_adaptive(
            trace, settings, max_size=case.max_size, max_provisioning=MAX_PROVISIONING
        )
        m = trace.arrivals >= trace.start
        row = _policy_row(res.waited[m], res.waits[m], res.idle_vm_h, res.created, res.peak_size)
        row["peak_booting"] = res.peak_booting
        late = trace.burst & (trace.arrivals >= burst_from)
        row["burst_served"] = float(1 - res.waited[late].mean()) if late.any() else 1.0
        later = trace.arrivals >= burst_from
        row["share_from_day3"] = float(res.waited[later].mean()) if later.any() else 0.0
        row["s_max"] = max(s for _, s in res.s_trace)
        adaptive.append(row)
        if case.max_size >= MAX_SIZE:
            sweeps.append(sweep_fixed(trace, burst_from))
    out: dict[str, Any] = {
        "name": case.name,
        "kind": case.kind,
        "max_size": case.max_size,
        "leases_per_run": int(min(leases)),
        "adaptive_runs": adaptive,
        "adaptive": {k: _median([r[k] for r in adaptive]) for k in adaptive[0]},
    }
    if sweeps:
        top = min(len(s.share) for s in sweeps)
        fixed = []
        for s in range(top):
            fixed.append(
                {
                    "s": s,
                    **{
                        key: _median([float(getattr(sw, key)[s]) for sw in sweeps])
                        for key in (
                            "share",
                            "burst_served",
                            "idle_vm_h",
                            "created",
                            "peak_size",
                            "wait_p50",
                            "wait_p99",
                        )
                    },
                }
            )
        out["fixed"] = fixed
    return out


def _fields(s: Settings) -> dict[str, Any]:
    return {k: getattr(s, k) for k in Settings.__dataclass_fields__}


def judge(case: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(target, passed, numbers) for one trace."""
    a = case["adaptive"]
    checks: list[tuple[str, bool, str]] = []
    runs = case["adaptive_runs"]
    size_ok = all(r["peak_size"] <= case["max_size"] for r in runs)
    prov_ok = all(r["peak_booting"] <= MAX_PROVISIONING for r in runs)
    checks.append(
        (
            "never above max_size / max_provisioning",
            size_ok and prov_ok,
            f"peak size {max(r['peak_size'] for r in runs)} <= {case['max_size']}, "
            f"boots in flight {max(r['peak_booting'] for r in runs)} <= {MAX_PROVISIONING}",
        )
    )
    if case["kind"] != "random" and case["max_size"] >= MAX_SIZE:
        key = "share_from_day3" if case["kind"] == "burst" else "share_waited"
        checks.append(
            (
                "adaptive meets the wait target"
                + (" (from day 3: days 1-2 teach the bursts)" if key != "share_waited" else ""),
                a[key] <= TARGET,
                f"{a[key]:.2%} <= {TARGET:.0%}",
            )
        )
    fixed = case.get("fixed")
    if not fixed:
        return checks
    meeting = [f for f in fixed if f["share"] <= TARGET]
    best = meeting[0] if meeting else fixed[-1]
    case["best_fixed_s"] = best["s"]
    if case["kind"] == "steady":
        lam_l = float(case["name"].removeprefix("steady-"))
        case["poisson_s"] = poisson_quantile(lam_l, TARGET)
        hours = case.get("hours", 1.0)
        allowed = max(0.15 * best["idle_vm_h"], hours)
        checks.append(
            (
                "idle within 15 % (or 1 VM) of the best fixed S",
                a["idle_vm_h"] <= best["idle_vm_h"] + allowed,
                f"{a['idle_vm_h']:.1f} vs {best['idle_vm_h']:.1f} VM-h at S={best['s']} "
                f"(Poisson S={case['poisson_s']})",
            )
        )
    elif case["kind"] == "changing":
        checks.append(
            (
                ">= 30 % fewer idle VM-hours than the best fixed S",
                a["idle_vm_h"] <= 0.7 * best["idle_vm_h"],
                f"{a['idle_vm_h']:.1f} vs {best['idle_vm_h']:.1f} VM-h at S={best['s']} "
                f"({1 - a['idle_vm_h'] / best['idle_vm_h']:.0%} fewer)",
            )
        )
    elif case["kind"] == "burst":
        serving = [f for f in fixed if f["burst_served"] >= 0.9]
        best = serving[0] if serving else fixed[-1]
        case["best_fixed_s"] = best["s"]
        checks.append(
            (
                ">= 90 % of burst leases served at once from day 3",
                a["burst_served"] >= 0.9,
                f"{a['burst_served']:.0%}",
            )
        )
        checks.append(
            (
                ">= 50 % fewer idle VM-hours than the fixed S serving the bursts",
                a["idle_vm_h"] <= 0.5 * best["idle_vm_h"],
                f"{a['idle_vm_h']:.0f} vs {best['idle_vm_h']:.0f} VM-h at S={best['s']}",
            )
        )
    if case["kind"] != "random":
        checks.append(
            (
                "VMs created <= 1.2x the best fixed S",
                a["created"] <= 1.2 * best["created"],
                f"{a['created']:.0f} vs {best['created']:.0f}",
            )
        )
    return checks


def run_all(out_dir: Path, names: list[str] | None = None) -> tuple[list[dict[str, Any]], bool]:
    results = []
    ok = True
    for case in CASES:
        if names and case.name not in names:
            continue
        started = time.perf_counter()
        res = run_case(case)
        res["hours"] = (make_trace(case.name, SEEDS[0]).end - WARM) / HOUR
        res["checks"] = [{"target": t, "pass": p, "numbers": s} for t, p, s in judge(res)]
        res["seconds"] = round(time.perf_counter() - started, 1)
        results.append(res)
        print(f"{case.name}: {res['leases_per_run']} leases/run, {res['seconds']} s")
        for c in res["checks"]:
            ok &= c["pass"]
            print(f"  {'PASS' if c['pass'] else 'FAIL'} {c['target']}: {c['numbers']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "autoscale.json").write_text(json.dumps(results, indent=1) + "\n")
    return results, ok


def main(out_dir: Path) -> int:
    """Run every trace, write the JSON, the plots and the docs table; 0 if all pass."""
    started = time.perf_counter()
    results, ok = run_all(out_dir)
    autoscale_report.plots(results, out_dir)
    autoscale_report.rewrite_doc(results, DOC)
    print(
        f"{'all targets PASS' if ok else 'some targets FAIL'} in {time.perf_counter() - started:.0f} s"
    )
    return 0
