"""A watch cache ("informer") of one kind of namespaced custom object.

List, then watch from the list's resourceVersion with bookmarks; when a watch
ends normally, resume from the last resourceVersion seen. Relist on 410 Gone,
on a lost connection and every ``resync_interval``. Failures back off with
jitter; requests go through the shared ``ApiCaller`` (rate limit, pauses).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from vmpool.core.backoff import Retry
from vmpool.core.echo import echo
from vmpool.providers import errors
from vmpool.providers.kubevirt_client import CONNECTION_ERRORS, ApiCaller, translate

log = structlog.get_logger(__name__)


#: A watch that ran this long before it broke counts as healthy: its backoff restarts.
_HEALTHY_AFTER = 10.0


class _Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): relist."""


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


class Informer:
    def __init__(
        self,
        api: client.CustomObjectsApi,
        caller: ApiCaller,
        *,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        label_selector: str,
        on_change: Callable[[], None],
        resync_interval: float = 300.0,
        watch_timeout: float = 290.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        request_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._caller = caller
        self._group = group
        self._version = version
        self._plural = plural
        self._namespace = namespace
        self._selector = label_selector
        self._on_change = on_change
        self._resync_interval = resync_interval
        self._watch_timeout = watch_timeout
        self._backoff = Retry(backoff_base, backoff_cap)
        self._request_timeout = request_timeout
        self._clock = clock
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = False
        self.resource_version: str | None = None
        self.lists = 0  # completed lists, for logs and tests
        self._attempt_started = clock()

    @property
    def what(self) -> str:
        return f"{self._plural} in namespace {self._namespace}"

    def forget(self, name: str) -> None:
        """Drop ``name`` after the API answered 404 for it."""
        if self.objects.pop(name, None) is not None:
            self._on_change()

    async def run(self) -> None:
        """List and watch until cancelled."""
        resync_at = 0.0
        while True:
            self._attempt_started = self._clock()
            try:
                if self.resource_version is None or self._clock() >= resync_at:
                    await self._relist()
                    resync_at = self._clock() + self._resync_interval
                await self._watch(until=resync_at)
                self._backoff.reset()
            except _Gone as gone:
                log.info("kubernetes_watch_expired", what=self.what, detail=str(gone))
                self.resource_version = None
                if self._backoff.attempt:  # a second 410 in a row: do not spin
                    await asyncio.sleep(self._backoff.next_delay())
                else:
                    self._backoff.attempt = 1
            except errors.ProviderError as err:
                self.resource_version = None  # relist after a lost connection
                if self._clock() - self._attempt_started > _HEALTHY_AFTER:
                    self._backoff.reset()  # ran long and well, then broke: start over
                delay = self._backoff.next_delay(at_least=err.retry_after or 0.0)
                log.warning(
                    "kubernetes_watch_failed", what=self.what, error=str(err), retry_in=delay
                )
                await asyncio.sleep(delay)

    async def _relist(self) -> None:
        result: Any = await self._caller.call(
            "list",
            self.what,
            lambda: self._api.list_namespaced_custom_object(
                self._group,
                self._version,
                self._namespace,
                self._plural,
                label_selector=self._selector,
                _request_timeout=self._request_timeout,
            ),
        )
        if not isinstance(result, dict):
            raise errors.ServerError(f"{self.what}: list answered {type(result).__name__}")
        items = result.get("items") or []
        fresh = {_name(obj): obj for obj in items if isinstance(obj, dict) and _name(obj)}
        changed = not self.synced or fresh != self.objects
        self.objects = fresh
        self.resource_version = str((result.get("metadata") or {}).get("resourceVersion") or "")
        self.synced = True
        self.lists += 1
        if changed:
            self._on_change()

    async def _watch(self, *, until: float) -> None:
        """One watch request; returns when the server ends it normally."""
        remaining = until - self._clock()
        if remaining < 1:
            return
        timeout = int(min(self._watch_timeout, remaining))
        await self._caller.before_request()
        stream = watch.Watch()
        try:
            events = stream.stream(
                self._api.list_namespaced_custom_object,
                self._group,
                self._version,
                self._namespace,
                self._plural,
                label_selector=self._selector,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _request_timeout=aiohttp.ClientTimeout(
                    total=timeout + self._request_timeout, sock_connect=self._request_timeout
                ),
            )
            async for event in events:
                self._apply(event)
        except ApiException as exc:
            if exc.status == 410:
                raise _Gone(str(exc.reason)) from None
            err = translate(exc, f"watch of {self.what}")
            self._caller.record_failure("watch", err)
            raise err from None
        except CONNECTION_ERRORS as exc:
            err = translate(exc, f"watch of {self.what}")
            self._caller.record_failure("watch", err)
            raise err from None
        finally:
            await stream.close()

    def _apply(self, event: Any) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("raw_object"), dict):
            raise errors.ServerError(
                f"watch of {self.what}: malformed event {echo(str(event), 200)}"
            )
        kind = event.get("type")
        obj: dict[str, Any] = event["raw_object"]
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if kind == "BOOKMARK":
            return
        name = _name(obj)
        if not name:
            return
        if kind in ("ADDED", "MODIFIED"):
            if self.objects.get(name) != obj:
                self.objects[name] = obj
                self._on_change()
        elif kind == "DELETED" and self.objects.pop(name, None) is not None:
            self._on_change()
