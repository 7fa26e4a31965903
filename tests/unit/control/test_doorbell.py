"""Waking the background loop from other threads: no news dropped, a burst costs
one hop. The hops are run by the test (a list), so every interleaving that
matters is written out instead of hoped for."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from vmpool.control.doorbell import Doorbell, Inbox


class Hops:
    """A scheduler whose hops run when the test says."""

    def __init__(self, accept: bool = True) -> None:
        self.queued: list[Callable[[], None]] = []
        self.accept = accept

    def __call__(self, hop: Callable[[], None]) -> bool:
        if self.accept:
            self.queued.append(hop)
        return self.accept

    def run(self) -> None:
        hops, self.queued = self.queued, []
        for hop in hops:
            hop()


def test_a_burst_costs_one_hop_and_it_carries_all_the_news() -> None:
    inbox, hops = Inbox(), Hops()
    seen: list[set[str | None]] = []
    bell = Doorbell(inbox, hops, lambda: seen.append(inbox.take()))
    for pool in ("a", "b", None, "a"):
        bell.ring(pool)
    assert len(hops.queued) == 1
    hops.run()
    assert seen == [{"a", "b", None}]
    bell.ring("c")  # after the hop: a new one
    assert len(hops.queued) == 1
    hops.run()
    assert seen[-1] == {"c"}


def test_a_ring_while_the_hop_runs_schedules_another() -> None:
    """Another thread rings just after the hop cleared its mark, before the
    consumer read the inbox: that news may be read now or by the next hop, but a
    next hop is scheduled, so it is never left unread."""
    inbox, hops = Inbox(), Hops()
    seen: list[set[str | None]] = []

    def consumer() -> None:
        if not seen:
            bell.ring("late")  # as if from another thread, mid-hop
        seen.append(inbox.take())

    bell = Doorbell(inbox, hops, consumer)
    bell.ring("first")
    hops.run()
    assert len(hops.queued) == 1, "the late ring scheduled no hop"
    hops.run()
    assert set().union(*seen) == {"first", "late"}
    assert not inbox


def test_news_that_cannot_be_delivered_yet_waits_in_the_inbox() -> None:
    inbox, hops = Inbox(), Hops(accept=False)
    seen: list[set[str | None]] = []
    bell = Doorbell(inbox, hops, lambda: seen.append(inbox.take()))
    bell.ring("early")  # not started: nothing scheduled, nothing lost
    assert hops.queued == [] and inbox.take() == {"early"}
    bell.ring("early")
    hops.accept = True
    bell.ring("later")  # the failed schedule left no pending mark behind
    hops.run()
    assert seen == [{"early", "later"}]


def test_rings_from_many_threads_all_reach_a_real_loop() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    inbox = Inbox()
    seen: set[str | None] = set()

    def schedule(hop: Callable[[], None]) -> bool:
        loop.call_soon_threadsafe(hop)
        return True

    def consumer() -> None:
        seen.update(inbox.take())

    bell = Doorbell(inbox, schedule, consumer)

    def storm(i: int) -> None:
        for j in range(300):
            bell.ring(f"t{i}-{j}")

    try:
        threads = [threading.Thread(target=storm, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = threading.Event()
        loop.call_soon_threadsafe(done.set)  # after every hop scheduled so far
        assert done.wait(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    assert not inbox
    assert len(seen) == 4 * 300
