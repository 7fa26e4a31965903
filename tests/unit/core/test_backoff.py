"""Backoff and Retry on injected clocks and random numbers: no sleeps, no timing."""

from __future__ import annotations

import itertools

import pytest

from tests.clocks import ManualClock
from vmpool.core.backoff import Backoff, Retry, backoff_delay


@pytest.mark.parametrize(("failures", "ceiling"), [(1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)])
def test_backoff_delay_is_between_half_and_all_of_the_capped_ceiling(
    failures: int, ceiling: float
) -> None:
    assert backoff_delay(failures, 2.0, 60.0, rng=lambda: 0.0) == ceiling / 2
    assert backoff_delay(failures, 2.0, 60.0, rng=lambda: 1.0) == ceiling


def test_backoff_per_key_blocks_until_its_delay_on_the_injected_clock() -> None:
    clock = ManualClock()
    backoff = Backoff(base=2.0, cap=60.0, clock=clock, rng=lambda: 1.0)
    assert not backoff.blocked("pool")
    assert backoff.failed("pool") == 2.0
    assert backoff.blocked("pool") and not backoff.blocked("other")
    assert backoff.until("pool") == clock.now + 2.0
    clock.now += 1.9
    assert backoff.blocked("pool")
    clock.now += 0.1
    assert not backoff.blocked("pool")
    assert backoff.failed("pool") == 4.0  # doubles while failures repeat
    assert backoff.failed("pool", at_least=30.0) == 30.0  # a server's Retry-After wins
    assert backoff.failures("pool") == 3
    backoff.succeeded("pool")
    assert not backoff.blocked("pool") and backoff.failures("pool") == 0
    assert backoff.until("pool") is None


def test_retry_sequence_grows_to_the_cap_and_resets() -> None:
    rng = itertools.cycle([1.0])
    retry = Retry(base=0.5, cap=4.0, rng=lambda: next(rng))
    assert [retry.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert retry.attempt == 6
    retry.reset()
    assert retry.next_delay() == 0.5
    assert retry.next_delay(at_least=9.0) == 9.0


def test_retry_without_jitter_doubles_exactly() -> None:
    """The database connection's reconnects (store/db.py, store/control.py)."""
    retry = Retry(base=0.5, cap=5.0, rng=lambda: 0.0, jitter=False)
    assert [retry.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
