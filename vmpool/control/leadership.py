"""What the reconciler knows of its own leadership (the election itself is
vmpool.store.control): asked before each pass and re-checked before each
provider call; told when a write finds it fenced."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from vmpool.ops.metrics import Metrics
from vmpool.store.errors import NotLeader

log = structlog.get_logger("vmpool.reconciler")


class Leadership:
    def __init__(self, metrics: Metrics, on_fenced: Callable[[], None]) -> None:
        self._metrics = metrics
        self._on_fenced = on_fenced  # a write found we no longer lead
        # Set by Reconciler.run(); passes called directly (tests) lead.
        self.is_leader: Callable[[], bool] = lambda: True
        self._was_leading = False
        self._since: float | None = None  # monotonic start of our term, as a pass saw it

    def leading_since(self, mono_now: float) -> float:
        """When this term's first pass ran (recorded by that pass): reservations
        are not expired for a while after it (vmpool.domain.planner)."""
        if self._since is None:
            self._since = mono_now
        return self._since

    def poll(self) -> tuple[bool, bool]:
        """(leading now, stepped down since the last poll); exports the gauge."""
        leading = self.is_leader()
        # Read at scrape time: a leader stuck in a pass (a stalled database)
        # shows 0 as soon as it stops trusting its term, not at its next poll.
        self._metrics.leader.set_function(lambda: 1 if self.is_leader() else 0)
        stepped_down = self._was_leading and not leading
        self._was_leading = leading
        if not leading:
            self._since = None  # a later term starts its own grace
        return leading, stepped_down

    def may_call_provider(self, name: str, what: str) -> bool:
        """Re-checked just before each provider call: a leader that was frozen
        (SIGSTOP, a long GC or VM pause) past its trusted term must not act on
        what it decided before, since a new leader may already be doing it."""
        if self.is_leader():
            return True
        log.info("provider call skipped: leadership not held", instance=name, call=what)
        return False

    def fenced(self, err: NotLeader) -> None:
        """A write was refused: we no longer lead; step down at once."""
        self._metrics.reconcile_errors.labels("fenced").inc()
        log.warning("reconcile pass stopped: leadership lost", error=str(err))
        self._on_fenced()
