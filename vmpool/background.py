"""The background work: reconciler, provider watches and leader election, on an
event loop of its own in a thread.

A storm of RPCs saturating the serving loop then delays a reconcile pass by a
GIL switch (milliseconds), not by the loop's whole backlog, and a long pass no
longer holds up RPCs. The two loops talk only through thread-safe calls:
``wake`` in, ``on_assigned`` and ``on_fatal`` out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable

import structlog

from vmpool.clock import utcnow
from vmpool.config import Config
from vmpool.metrics import Metrics
from vmpool.providers.base import Provider
from vmpool.providers.errors import ProviderError
from vmpool.reconciler import Inbox, Reconciler
from vmpool.store.control import Control
from vmpool.store.db import Database, connect
from vmpool.store.errors import StoreUnavailable
from vmpool.store.fakecloud import FakeCloud
from vmpool.store.inventory import Inventory

log = structlog.get_logger("vmpool")

WAKE_EVERY = 0.01  # seconds: at most this often, one cross-thread wake-up


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


def build_provider(config: Config, db: Database, metrics: Metrics) -> Provider:
    if config.provider.kind == "kubevirt":
        from vmpool.providers.kubevirt import build_kubevirt_provider

        return build_kubevirt_provider(config.provider.kubevirt, config.pools, metrics)
    from vmpool.providers.fake import FakeProvider

    return FakeProvider(FakeCloud(db), config.provider.fake)


class Background:
    def __init__(
        self,
        config: Config,
        url: str,
        metrics: Metrics,
        *,
        on_assigned: Callable[[str], None],
        on_fatal: Callable[[str], None],
    ) -> None:
        """``on_assigned`` and ``on_fatal`` are called from the background thread."""
        self._config = config
        self._url = url
        self._metrics = metrics
        self._on_assigned = on_assigned
        self._on_fatal = on_fatal
        self._thread = threading.Thread(target=self._main, name="vmpool-background", daemon=True)
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._reconciler: Reconciler | None = None
        self._control: Control | None = None
        self._wake_pending = False
        self._last_wake = -1e9
        self._inbox = Inbox()

    async def start(self) -> None:
        """Connect, start the provider, begin; StartupError if that fails."""
        self._thread.start()
        await asyncio.wrap_future(self._ready)

    def wake(self, pool: str | None = None) -> None:
        """Ask the reconciler for a pass soon over ``pool`` (None: every pool), from
        any thread. The news goes to the reconciler's inbox; waking its loop costs
        a system call, so that is done at most every WAKE_EVERY seconds (a busy
        reconciler reads its inbox after each pass anyway)."""
        self._inbox.put(pool)
        loop = self._loop
        now = time.monotonic()
        if self._wake_pending or now - self._last_wake < WAKE_EVERY:
            return
        if loop is None or self._reconciler is None or loop.is_closed():
            return
        self._wake_pending = True
        self._last_wake = now
        with contextlib.suppress(RuntimeError):  # closed meanwhile: shutting down
            loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        self._wake_pending = False
        if self._reconciler is not None:
            self._reconciler.wake_pools(())  # the news is in its inbox

    def is_leader(self) -> bool:
        return self._control is not None and self._control.is_leader()

    async def stop(self, timeout: float = 15.0) -> None:
        """Stop between actions and wait for the thread (bounded)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # already finished
                loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            log.warning("background work did not stop in time")

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as err:  # a bug: say so, and stop the server rather than run headless
            log.exception("background work crashed")
            if not self._ready.done():
                self._ready.set_exception(StartupError(f"background work crashed: {err!r}"))
            else:
                self._on_fatal(repr(err))

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = self._config
        try:
            db = await connect(self._url, min_size=1, max_size=4)
        except StoreUnavailable as err:
            self._ready.set_exception(StartupError(f"database_url: {err}"))
            return
        try:
            provider = build_provider(config, db, self._metrics)
            reconciler = Reconciler(
                Inventory(db),
                provider,
                config,
                utcnow,
                self._metrics,
                self._on_assigned,
                inbox=self._inbox,
            )
            control = Control(
                self._url,
                config.reconcile_interval.total_seconds(),
                on_wake=reconciler.wake,
                on_assigned=self._on_assigned,
                on_leadership=lambda _leading: reconciler.wake(),
            )
            self._reconciler, self._control = reconciler, control
            try:
                await provider.start(reconciler.provider_changed)
            except ProviderError as err:
                self._ready.set_exception(StartupError(f"provider {config.provider.kind}: {err}"))
                return
            self._ready.set_result(None)
            await self._work(reconciler, control)
            await provider.close()
            await control.close()
        finally:
            await db.close()

    async def _work(self, reconciler: Reconciler, control: Control) -> None:
        stop = self._stop
        assert stop is not None

        def died(task: asyncio.Task[None]) -> None:
            if not stop.is_set() and not task.cancelled():
                error = repr(task.exception())
                log.error("background task ended unexpectedly", task=task.get_name(), error=error)
                stop.set()
                self._on_fatal(f"{task.get_name()}: {error}")

        async with asyncio.TaskGroup() as tasks:
            for name, coro in (
                ("control", control.run(stop)),
                ("reconciler", reconciler.run(stop, control.is_leader)),
            ):
                tasks.create_task(coro, name=name).add_done_callback(died)
