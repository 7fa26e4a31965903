"""Whether the database answers, checked at most twice a second however often asked."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import structlog

from vmpool.ops.metrics import Metrics
from vmpool.store.errors import StoreReadOnly, StoreUnavailable


class Pinger(Protocol):
    async def ping(self, timeout: float) -> None: ...


FRESH = 0.5  # seconds a successful check stays good
TIMEOUT = 1.0  # "does not answer within about a second"
WATCH_EVERY = 5.0  # seconds between checks where no readiness probe asks

log = structlog.get_logger("vmpool")


class DatabaseHealth:
    def __init__(self, store: Pinger, metrics: Metrics | None = None) -> None:
        self._store = store  # vmpool.store.probe: a connection of its own
        self._metrics = metrics
        self._ok_at = -1e9
        self._inflight: asyncio.Future[None] | None = None

    async def check(self) -> None:
        """Return if the database answered recently; raise StoreUnavailable if not."""
        if time.monotonic() - self._ok_at < FRESH:
            return
        probe = self._inflight
        if probe is None:
            probe = self._inflight = asyncio.ensure_future(self._probe())
            # Callers may give up (timeout, cancelled call): the outcome is still read.
            probe.add_done_callback(lambda f: f.cancelled() or f.exception())
        # asyncio.wait, not wait_for: a query to a hung database can take seconds
        # to cancel, and the answer must come within about a second regardless.
        done, _ = await asyncio.wait({probe}, timeout=TIMEOUT)
        if not done:
            raise StoreUnavailable(f"database did not answer within {TIMEOUT:g}s")
        probe.result()

    async def close(self) -> None:
        """End a probe still in flight (a hung database): none may outlive the server."""
        probe, self._inflight = self._inflight, None
        if probe is not None and not probe.done():
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(probe), 1.0)

    async def watch(self, stop: asyncio.Event, every: float = WATCH_EVERY) -> None:
        """Check every ``every`` seconds until ``stop``: keeps vmpool_database_up
        and vmpool_database_read_only current in a process no readiness probe
        asks (``--role reconciler``), so its alerts mean what they do for the API."""
        while not stop.is_set():
            try:
                await self.check()
            except StoreUnavailable:
                pass  # the gauges say so
            except Exception:  # a bug in a check must not stop the checking
                log.exception("database check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    async def _probe(self) -> None:
        up = read_only = False
        try:
            await self._store.ping(TIMEOUT)
            self._ok_at = time.monotonic()
            up = True
        except StoreReadOnly:
            up = read_only = True
            raise
        finally:
            self._inflight = None
            if self._metrics is not None:
                self._metrics.database_up.set(up)
                self._metrics.database_read_only.set(read_only)
