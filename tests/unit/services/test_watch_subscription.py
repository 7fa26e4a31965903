"""A stream is ended as a slow reader only when it fell behind, not because
events arrived in a burst it could not take from while they were queued."""

from __future__ import annotations

from datetime import UTC, datetime

from vmpool.domain.watch import Cursor, Event, Scope
from vmpool.services.watch_subscription import Item, Subscription

LIMIT = 10


def item(n: int) -> Item:
    e = Event(
        n, 0, n, datetime(2026, 1, 1, tzinfo=UTC), "leased", f"vmp-{n}", "q", "", "", "", None, None
    )
    return (e, None, False)


def push_batch(sub: Subscription, batch: int, size: int) -> None:
    """What the hub does with one fetch: every event queued before any await."""
    for n in range(size):
        sub.push(item(batch * 1000 + n), LIMIT, batch)


def fresh() -> Subscription:
    return Subscription(Scope(), None, None, Cursor(0, 0))


def test_a_burst_larger_than_the_buffer_does_not_end_a_reader_that_keeps_up() -> None:
    sub = fresh()
    push_batch(sub, 1, 3 * LIMIT)
    assert sub.ended is None and len(sub.queue) == 3 * LIMIT
    sub.queue.clear()  # the stream's task sends them
    push_batch(sub, 2, 3 * LIMIT)
    assert sub.ended is None


def test_a_reader_still_a_buffer_behind_when_the_next_events_come_is_ended() -> None:
    sub = fresh()
    push_batch(sub, 1, LIMIT)
    push_batch(sub, 2, 1)
    assert sub.ended is not None and sub.ended.code == "RESOURCE_EXHAUSTED"
    assert f"fell {LIMIT} events behind" in str(sub.ended)
    assert not sub.queue


def test_one_at_a_time_the_buffer_is_the_limit() -> None:
    sub = fresh()
    for n in range(LIMIT):
        sub.push(item(n), LIMIT)
    assert sub.ended is None
    sub.push(item(LIMIT), LIMIT)
    assert sub.ended is not None
