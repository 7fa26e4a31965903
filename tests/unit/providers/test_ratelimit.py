"""The KubeVirt client's TokenBucket on an injected clock: no sleeps, no timing."""

from __future__ import annotations

import pytest

from tests.clocks import ManualClock
from vmpool.providers.ratelimit import TokenBucket


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = ManualClock()
    bucket = TokenBucket(qps=10, burst=3, clock=clock)
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    # Then one token per 1/qps: each waiter is told when its turn comes.
    assert [round(bucket.reserve(), 6) for _ in range(3)] == [0.1, 0.2, 0.3]
    clock.now += 1.0  # refilled (to the burst, not beyond)
    waits = [bucket.reserve() for _ in range(5)]
    assert sum(1 for w in waits if w == 0.0) == 3


def test_token_bucket_never_exceeds_burst_plus_rate_in_any_second() -> None:
    clock = ManualClock()
    qps, burst = 20.0, 5
    bucket = TokenBucket(qps=qps, burst=burst, clock=clock)
    start = clock.now
    due = [start + bucket.reserve() for _ in range(100)]  # a storm in one instant
    for i, t in enumerate(due):
        in_window = sum(1 for u in due[i:] if u < t + 1.0)
        assert in_window <= burst + qps
    assert due[-1] - start == pytest.approx((100 - burst) / qps)


def test_token_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="qps"):
        TokenBucket(qps=0, burst=1)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(qps=1, burst=0)
