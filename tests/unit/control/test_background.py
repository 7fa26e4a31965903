"""The calls that cross from the serving thread into the background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from vmpool.config.loading import parse_config
from vmpool.control.background import Background
from vmpool.ops.metrics import Metrics


class FakeReconciler:
    """Reads the inbox when woken, on the background loop, as Reconciler does."""

    def __init__(self, background: Background) -> None:
        self.background = background
        self.seen: set[str | None] = set()
        self.wakes = 0

    def wake_pools(self, pools: Any) -> None:
        assert threading.current_thread().name == "fake-background"
        self.wakes += 1
        self.seen |= self.background._inbox.take()


@pytest.fixture
def background_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-background", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def drained(loop: asyncio.AbstractEventLoop) -> None:
    """Wait until everything scheduled on ``loop`` so far has run."""
    done = threading.Event()
    loop.call_soon_threadsafe(done.set)
    assert done.wait(5)


def test_no_wake_up_is_ever_dropped(background_loop: asyncio.AbstractEventLoop) -> None:
    background = Background(
        parse_config({}), "postgresql://unused", Metrics(), on_assigned=print, on_fatal=print
    )
    fake = FakeReconciler(background)
    background._loop = background_loop
    background._reconciler = fake  # type: ignore[assignment]
    for round_ in range(200):
        # Bursts far inside any throttle window, then a pause for the loop.
        for pool in (f"p{round_}", f"q{round_}", None):
            background.wake(pool)
        drained(background_loop)
        # Whatever was put, the reconciler was woken after it and read it.
        assert background._inbox.take() == set(), f"news left unread in round {round_}"
        assert {f"p{round_}", f"q{round_}", None} <= fake.seen
    # Merged, not one hop per call: fewer wake-ups than calls.
    assert 200 <= fake.wakes < 600


def test_wake_before_start_keeps_the_news_for_the_first_pass() -> None:
    background = Background(
        parse_config({}), "postgresql://unused", Metrics(), on_assigned=print, on_fatal=print
    )
    background.wake("early")  # no loop yet: nothing scheduled, nothing lost
    assert background._inbox.take() == {"early"}


def test_wake_from_many_threads_at_once(background_loop: asyncio.AbstractEventLoop) -> None:
    background = Background(
        parse_config({}), "postgresql://unused", Metrics(), on_assigned=print, on_fatal=print
    )
    fake = FakeReconciler(background)
    background._loop = background_loop
    background._reconciler = fake  # type: ignore[assignment]

    def storm(i: int) -> None:
        for j in range(300):
            background.wake(f"t{i}-{j}")

    threads = [threading.Thread(target=storm, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drained(background_loop)
    assert background._inbox.take() == set()
    assert len(fake.seen) == 4 * 300
