"""The desired ready buffer S (issue 24) as table tests on an injected clock."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime

import pytest

from vmpool.config.schema import PoolConfig
from vmpool.domain.autoscale import (
    AIM,
    Demand,
    Learned,
    Settings,
    decide,
    least_ready,
    observe_boot,
    poisson_quantile,
)
from vmpool.domain.planner import Action, PoolObserved, PoolTarget, Shrink, plan_pool

DAY = 86_400.0


def tail(mean: float, s: int) -> float:
    """P(Poisson(mean) >= s), directly."""
    return 1.0 - sum(math.exp(-mean) * mean**k / math.factorial(k) for k in range(s))


@pytest.mark.parametrize("mean", [0.5, 1, 10, 30, 120])
@pytest.mark.parametrize("share", [0.01, 0.05])
def test_poisson_quantile_is_the_least_s_meeting_the_share(mean: float, share: float) -> None:
    s = poisson_quantile(mean, share)
    assert tail(mean, s) <= share < tail(mean, s - 1)


@pytest.mark.parametrize(("mean", "s"), [(0, 0), (1, 5), (10, 19), (30, 44)])
def test_poisson_quantile_values(mean: float, s: int) -> None:
    assert poisson_quantile(mean, 0.01) == s


def test_demand_counts_within_spans() -> None:
    d = Demand(slot=1.0, keep=100.0, since=0.0)
    for t in (1.5, 2.5, 2.7, 50.0, 99.2):
        d.add(t)
    d.add(51.0, 3)
    assert d.counts_within(99.5, [1, 10, 50, 100]) == [1, 1, 5, 8]
    d.trim(140.0)
    assert d.total() == 5  # the first three slots are older than keep


def feed(d: Demand, rate: float, start: float, end: float) -> None:
    """Evenly spaced arrivals at ``rate`` per second."""
    n = int((end - start) * rate)
    for i in range(n):
        d.add(start + (i + 0.5) / rate)


def run(
    settings: Settings, learned: Learned, d: Demand, start: float, end: float, step: float = 5.0
) -> list[tuple[float, int]]:
    out = []
    t = start
    while t <= end:
        out.append((t, decide(settings, learned, d, t, 10_000).s))
        t += step
    return out


def booted(seconds: float = 60.0) -> Learned:
    learned = Learned()
    for _ in range(10):
        observe_boot(learned, seconds)
    return learned


S = Settings(floor=1, ceiling=200, target=0.01, delay=600, learn_daily=False, window=1800)


@pytest.mark.parametrize("per_minute", [1, 10, 30])
def test_a_steady_rate_sizes_s_at_the_poisson_quantile(per_minute: int) -> None:
    expect = poisson_quantile(per_minute, S.target * AIM)  # aimed a little under the target
    d = Demand(S.slot, S.window, since=0.0)
    learned = booted()
    feed(d, per_minute / 60, 0, 3600)
    decision = decide(S, learned, d, 3600, 10_000)
    assert decision.reason == "rate"
    assert abs(decision.rate * 60 - per_minute) < 0.05 * per_minute
    assert abs(decision.s - expect) <= 1  # the measured rate is within 5 %


def test_a_rise_is_followed_within_a_boot_time_or_two() -> None:
    d = Demand(S.slot, S.window, since=0.0)
    learned = booted()
    feed(d, 1 / 60, 0, 3600)
    assert run(S, learned, d, 3000, 3600)[-1][1] == 5
    feed(d, 20 / 60, 3600, 3720)  # λL 1 -> 20
    s = decide(S, learned, d, 3720, 10_000).s
    assert s >= 20  # two boot times in: most of the way to q(20) = 32


def test_a_fall_waits_for_the_delay_then_goes_down_gradually_to_the_floor() -> None:
    d = Demand(S.slot, S.window, since=0.0)
    learned = booted()
    feed(d, 20 / 60, 0, 3600)
    top = decide(S, learned, d, 3600, 10_000).s
    assert top >= 30
    # Demand stops. S stays up for the delay ...
    trace = dict(run(S, learned, d, 3605, 3600 + 3 * 600))
    assert all(s == top for t, s in trace.items() if t < 3600 + 600)
    # ... then falls one step at a time, never below the floor.
    falling = [s for t, s in sorted(trace.items()) if t >= 3600 + 600]
    assert falling == sorted(falling, reverse=True)
    assert 1 < falling[len(falling) // 4] < top
    assert max(a - b for a, b in itertools.pairwise(falling)) <= 2
    assert falling[-1] == S.floor


@pytest.mark.parametrize(
    ("floor", "ceiling", "max_size", "expect", "reason"),
    [(25, 100, 100, 25, "floor"), (1, 10, 100, 10, "ceiling"), (1, 100, 7, 7, "max_size")],
)
def test_s_stays_within_floor_ceiling_and_max_size(
    floor: int, ceiling: int, max_size: int, expect: int, reason: str
) -> None:
    settings = Settings(floor=floor, ceiling=ceiling, learn_daily=False)
    d = Demand(settings.slot, settings.window, since=0.0)
    feed(d, 5 / 60, 0, 1800)  # λL 5: q = 12
    decision = decide(settings, booted(), d, 1800, max_size)
    assert (decision.s, decision.reason) == (expect, reason)


def burst(d: Demand, at: float, n: int = 40, spread: float = 60.0) -> None:
    for i in range(n):
        d.add(at + spread * i / n)


P = Settings(floor=1, ceiling=200, delay=600, learn_daily=True, period=DAY, bin=300, window=1800)


def test_a_burst_seen_on_two_days_is_booted_for_before_it_comes_on_the_third() -> None:
    d = Demand(P.slot, P.window, since=0.0)
    learned = booted()
    nine = 9 * 3600
    for day in (0, 1):
        burst(d, day * DAY + nine)
        run(P, learned, d, day * DAY + nine - 600, day * DAY + nine + 3600, step=10)
    third = 2 * DAY + nine
    run(P, learned, d, third - 3600, third - 200, step=10)  # quiet before it
    early = decide(P, learned, d, third - 90, 10_000)
    assert early.s <= 3  # not yet: lead is one boot-time quantile (60 s)
    ahead = decide(P, learned, d, third - 55, 10_000)
    assert (ahead.s >= 40, ahead.reason) == (True, "profile")
    assert ahead.profile_term >= 40


def test_a_burst_seen_once_is_not_learned() -> None:
    d = Demand(P.slot, P.window, since=0.0)
    learned = booted()
    nine = 9 * 3600
    burst(d, nine)
    run(P, learned, d, nine - 600, nine + 3600, step=10)
    run(P, learned, d, DAY + nine - 3600, DAY + nine - 200, step=10)
    assert decide(P, learned, d, DAY + nine - 30, 10_000).s <= 3


def test_boot_time_is_learned_and_sizes_s() -> None:
    d = Demand(S.slot, S.window, since=0.0)
    feed(d, 10 / 60, 0, 3600)
    slow = decide(S, booted(120.0), d, 3600, 10_000)
    fast = decide(S, booted(30.0), d, 3600, 10_000)
    assert slow.boot_mean == 120.0 and fast.boot_mean == 30.0
    assert fast.s < 19 < slow.s


# --- the planner with an autoscaled S ------------------------------------------------


def plan(ready: int, booting: int, s: int, autoscaled: bool, waiting: int = 0) -> list[Action]:
    observed = PoolObserved(
        "p",
        ready=ready,
        ready_current=ready,
        provisioning=booting,
        provisioning_current=booting,
        waiting=waiting,
    )
    target = PoolTarget("p", min_ready=s, max_size=100, max_provisioning=100, autoscaled=autoscaled)
    return plan_pool(observed, target, datetime(2026, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("ready", "booting", "s", "waiting", "expect"),
    [
        (10, 0, 4, 0, [Shrink("p", 6)]),  # the oldest six go
        (3, 5, 4, 0, [Shrink("p", 3)]),  # boots above S count: ready ones go first
        (2, 2, 4, 0, []),
        (6, 0, 4, 3, []),  # calls are waiting: nothing is shed
    ],
)
def test_a_falling_s_sheds_ready_vms_above_it(
    ready: int, booting: int, s: int, waiting: int, expect: list[Action]
) -> None:
    assert [a for a in plan(ready, booting, s, True, waiting) if isinstance(a, Shrink)] == expect


def test_without_autoscale_the_planner_never_sheds_ready_vms() -> None:
    assert plan(10, 0, 4, False) == []


@pytest.mark.parametrize(
    ("block", "expect"),
    [(None, 2), ({"floor": 0}, 0), ({"floor": 1, "mode": "observe"}, 2)],
)
def test_an_acting_pool_is_running_once_its_floor_is_ready(
    block: dict[str, object] | None, expect: int
) -> None:
    pool = PoolConfig.model_validate(
        {"name": "p", "min_ready": 2, "max_size": 5, "autoscale": block}
    )
    assert least_ready(pool) == expect
