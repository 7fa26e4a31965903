"""The background work: reconciler, provider watches and leadership, on an
event loop of its own in a thread.

Why a thread: a storm of RPCs saturating the serving loop then delays a
reconcile pass by a GIL switch (milliseconds), not by the loop's whole
backlog, and a long pass never holds up RPCs. With ``--role reconciler`` the
same code runs in a process of its own (no RPCs), and with ``--role api``
only the LISTEN half of the control connection runs here (no reconciler).

Every call that crosses the two threads, and how:

- ``wake(pool)``     serving -> background (vmpool/control/doorbell.py, tested in
                     tests/unit/control/test_doorbell.py): the pool goes into the
                     reconciler's Inbox (a lock); one ``call_soon_threadsafe`` is
                     scheduled unless one is already pending, so a wake-up is never
                     dropped, only merged with one that has not run yet. With
                     role api the hop sends a NOTIFY instead (the reconciler
                     runs in another process).
- ``is_leader()``, ``provider_usable()``  serving reads fields the background
                     thread writes (bools and a float: atomic under the GIL).
- ``stop()``         serving -> background: ``call_soon_threadsafe(stop.set)``,
                     then joins the thread (bounded).
- ``on_assigned``, ``on_fatal``  background -> serving: the callbacks given
                     by the composition root, which hop with
                     ``call_soon_threadsafe`` (vmpool/app.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable

import structlog

from vmpool.config.schema import Config
from vmpool.control.dbwatch import ReplicationWatch
from vmpool.control.doorbell import Doorbell, Inbox
from vmpool.control.reconciler import Reconciler
from vmpool.core import eventloop
from vmpool.core.clock import utcnow
from vmpool.ops.metrics import Metrics
from vmpool.providers.base import Provider
from vmpool.providers.errors import ProviderError
from vmpool.providers.fake import FakeProvider
from vmpool.store.autoscale import AutoscaleStore
from vmpool.store.connect import ConnectSettings
from vmpool.store.control import Control
from vmpool.store.db import Database, connect
from vmpool.store.errors import StoreUnavailable
from vmpool.store.fakecloud import FakeCloud
from vmpool.store.inventory import Inventory
from vmpool.store.pools import PoolStore

log = structlog.get_logger("vmpool")

ROLES = ("all", "api", "reconciler")


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


class SettingNotMet(StartupError):
    """A configured requirement the environment does not meet (e.g.
    database.require_synchronous_standby): a configuration error, exit 2."""


class FatalError(Exception):
    """The server stopped by itself (a bug in the background work): exit non-zero."""


def build_provider(config: Config, db: Database, metrics: Metrics) -> Provider:
    if config.provider.kind == "kubevirt":
        # lazy: kubernetes_asyncio takes seconds to import; only provider kubevirt needs it
        from vmpool.providers.kubevirt import build_kubevirt_provider

        return build_kubevirt_provider(config.provider.kubevirt, config.pools, metrics)
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
        reconcile: bool = True,
    ) -> None:
        """``on_assigned`` and ``on_fatal`` are called from the background thread.
        ``reconcile=False`` (role api): LISTEN only, never lead."""
        self._config = config
        self._reconcile = reconcile
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
        self._inbox = Inbox()
        self._doorbell = Doorbell(self._inbox, self._schedule, self._woken)
        self._notifies: set[asyncio.Task[None]] = set()  # role api: NOTIFYs in flight

    async def start(self) -> None:
        """Connect, start the provider, begin; StartupError if that fails."""
        self._thread.start()
        await asyncio.wrap_future(self._ready)

    def wake(self, pool: str | None = None) -> None:
        """Ask the reconciler for a pass soon over ``pool`` (None: every pool), from
        any thread. The news goes to the reconciler's inbox first; then one hop
        to its loop is scheduled unless one is pending already (that one runs
        after this put, so it carries this news too: nothing is dropped)."""
        self._doorbell.ring(pool)

    def _schedule(self, hop: Callable[[], None]) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed():
            return False  # not started (the first pass reads the inbox) or stopping
        if (self._reconciler if self._reconcile else self._control) is None:
            return False  # still starting: the first pass reads the inbox
        try:
            loop.call_soon_threadsafe(hop)
        except RuntimeError:  # closed meanwhile: shutting down
            return False
        return True

    def _woken(self) -> None:
        if self._reconciler is not None:
            self._reconciler.wake_pools(())  # the news is in its inbox
        elif self._control is not None:  # role api: the reconciler is elsewhere
            self._inbox.take()
            task = asyncio.get_running_loop().create_task(self._control.notify_wake("api"))
            self._notifies.add(task)
            task.add_done_callback(self._notifies.discard)

    def provider_usable(self) -> bool:
        """False while this process leads and its provider cannot be used (its
        last look at the VMs failed); a follower or an api process says True."""
        r = self._reconciler
        return r is None or not self.is_leader() or r.provider_usable

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
            eventloop.run(self._run())
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
        interval = config.reconcile_interval.total_seconds()
        settings = ConnectSettings.from_config(config.database)
        if not self._reconcile:  # role api: the control connection (LISTEN) only
            control = Control(
                self._url,
                interval,
                lambda: None,
                self._on_assigned,
                lead=False,
                settings=settings,
                on_dropped=self._metrics.connection_dropped("control"),
            )
            self._control = control
            self._ready.set_result(None)
            try:
                await self._work(None, control)
            finally:
                await control.close()
            return
        try:
            db = await connect(
                self._url,
                min_size=1,
                max_size=4,
                settings=settings,
                on_dropped=self._metrics.connection_dropped("pool"),
            )
        except StoreUnavailable as err:
            self._ready.set_exception(StartupError(f"database_url: {err}"))
            return
        try:
            reconciler: Reconciler | None = None

            def woken() -> None:
                if reconciler is not None:
                    reconciler.wake()

            control = Control(
                self._url,
                interval,
                on_wake=woken,
                on_assigned=self._on_assigned,
                on_leadership=lambda _leading: woken(),
                ttl=config.reconciler.leader_ttl.total_seconds(),
                settings=settings,
                on_connected=ReplicationWatch(self._metrics).on_connected,
                on_dropped=self._metrics.connection_dropped("control"),
            )
            provider = build_provider(config, db, self._metrics)
            inventory = Inventory(db, fence=control.fence)
            reconciler = Reconciler(
                inventory,
                provider,
                config,
                utcnow,
                self._metrics,
                self._on_assigned,
                inbox=self._inbox,
                on_fenced=control.step_down,
                pool_store=PoolStore(db),
                autoscale_store=AutoscaleStore(db, fenced=inventory.fenced),
            )
            self._reconciler, self._control = reconciler, control
            try:
                await provider.start(reconciler.provider_changed)
            except ProviderError as err:
                self._ready.set_exception(StartupError(f"provider {config.provider.kind}: {err}"))
                return
            self._ready.set_result(None)
            try:
                await self._work(reconciler, control)
            finally:
                await provider.close()
        finally:
            if self._control is not None:
                await self._control.close()
            await db.close()

    async def _work(self, reconciler: Reconciler | None, control: Control) -> None:
        """Run until stopped. Shutdown order: the reconciler stops and its
        provider calls finish or are cancelled; only then does the control
        loop end, releasing leadership (a follower takes over at once)."""
        stop = self._stop
        assert stop is not None
        control_stop = asyncio.Event()

        def died(task: asyncio.Task[None]) -> None:
            expected = control_stop if task.get_name() == "control" else stop
            if not expected.is_set() and not task.cancelled():
                error = repr(task.exception())
                log.error("background task ended unexpectedly", task=task.get_name(), error=error)
                stop.set()
                control_stop.set()
                self._on_fatal(f"{task.get_name()}: {error}")

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(control.run(control_stop), name="control").add_done_callback(died)
            if reconciler is not None:
                work = tasks.create_task(reconciler.run(stop, control.is_leader), name="reconciler")
                work.add_done_callback(died)
                await asyncio.wait([work])
            else:
                await stop.wait()
            control_stop.set()
