"""Waking a loop in another thread without losing news and without one hop per call.

The news goes into the inbox first; then one hop to the other loop is scheduled
unless one is pending. A pending hop has not read the inbox yet (it clears the
pending mark before it reads), so it carries this news too: nothing is dropped,
and a burst of calls costs one hop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Inbox:
    """Pools with news for the reconciler (None: every pool), put from any thread
    and taken by the reconciler's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: set[str | None] = set()

    def put(self, pool: str | None) -> None:
        with self._lock:
            self._items.add(pool)

    def take(self) -> set[str | None]:
        with self._lock:
            items, self._items = self._items, set()
        return items

    def __bool__(self) -> bool:
        return bool(self._items)


class Doorbell:
    """``ring(pool)`` from any thread; ``on_ring()`` runs on the other loop, after
    the news is in ``inbox``. ``schedule(hop)`` runs ``hop`` there later and says
    whether it could (False: not started or stopping; the news waits in the inbox
    for the first read)."""

    def __init__(
        self,
        inbox: Inbox,
        schedule: Callable[[Callable[[], None]], bool],
        on_ring: Callable[[], None],
    ) -> None:
        self.inbox = inbox
        self._schedule = schedule
        self._on_ring = on_ring
        self._pending = False

    def ring(self, pool: str | None) -> None:
        self.inbox.put(pool)
        if self._pending:
            return
        self._pending = True
        if not self._schedule(self._hop):
            self._pending = False

    def _hop(self) -> None:
        self._pending = False  # first: a ring after this schedules a new hop
        self._on_ring()
