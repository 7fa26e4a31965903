"""Talking to the Kubernetes API: config loading, error translation, paced retries.

Every ``ApiException`` (and every connection error) is translated into a
``vmpool.providers.errors`` error here, once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from vmpool.core.backoff import Retry
from vmpool.core.echo import echo
from vmpool.ops.metrics import Metrics
from vmpool.providers import errors
from vmpool.providers.ratelimit import TokenBucket

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Remote payloads in messages are cut to this many characters.
MAX_REMOTE_TEXT = 256

#: Errors worth another try after a pause.
RETRYABLE: tuple[type[errors.ProviderError], ...] = (
    errors.TooManyRequests,
    errors.ServerError,
    errors.Unavailable,
)

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    OSError,
    TimeoutError,
)

_CAUGHT: tuple[type[BaseException], ...] = (ApiException, *CONNECTION_ERRORS)


def _existing_file(kubeconfig: str) -> str:
    path = Path(kubeconfig).expanduser()
    if not path.is_file():
        raise errors.Unavailable(f"provider.kubevirt.kubeconfig: no such file: {kubeconfig}")
    return str(path)


async def load_client_configuration(kubeconfig: str) -> client.Configuration:
    """The API address and credentials: ``kubeconfig`` if given, else in-cluster,
    else ``~/.kube/config``. Raises ``errors.Unavailable`` naming what was tried."""
    configuration = client.Configuration()
    if kubeconfig:
        path = _existing_file(kubeconfig)
        try:
            await config.load_kube_config(
                config_file=path,
                client_configuration=configuration,
                persist_config=False,
            )
        except (ConfigException, OSError) as err:
            raise errors.Unavailable(
                f"provider.kubevirt.kubeconfig: cannot load {kubeconfig}: {err}"
            ) from None
        return configuration
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except ConfigException as in_cluster_err:
        try:
            await config.load_kube_config(client_configuration=configuration, persist_config=False)
        except (ConfigException, OSError) as err:
            raise errors.Unavailable(
                "provider.kubevirt.kubeconfig is empty and neither the in-cluster config "
                f"({in_cluster_err}) nor ~/.kube/config ({err}) could be loaded"
            ) from None
    return configuration


def _truncate(text: str) -> str:
    return echo(" ".join(text.split()), MAX_REMOTE_TEXT)


def _status_body(exc: ApiException) -> dict[str, Any]:
    raw: object = exc.body
    body = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if isinstance(body, str) and body:
        try:
            parsed = json.loads(body)
        except ValueError:
            return {"message": body}
        if isinstance(parsed, dict):
            return parsed
    return {}


def retry_after_of(exc: ApiException) -> float | None:
    """Seconds from the Retry-After header or the Status's details.retryAfterSeconds."""
    headers = exc.headers
    if headers is not None:
        value = headers.get("Retry-After")
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                pass  # an HTTP date: rare from kube-apiserver; fall back to the body
    details = _status_body(exc).get("details") or {}
    seconds = details.get("retryAfterSeconds") if isinstance(details, dict) else None
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        return max(0.0, float(seconds))
    return None


def translate(exc: BaseException, what: str) -> errors.ProviderError:
    """The provider error for ``exc`` raised while working on ``what``."""
    if isinstance(exc, errors.ProviderError):
        return exc
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        body = _status_body(exc)
        detail = str(body.get("message") or exc.reason or "")
        message = f"{what}: HTTP {status}: {_truncate(detail)}".rstrip(": ")
        if status == 404:
            return errors.NotFound(message)
        if status == 409:
            return errors.Conflict(message)
        if status == 429:
            return errors.TooManyRequests(message, retry_after=retry_after_of(exc))
        if status in (400, 422):
            return errors.Invalid(message)
        if status >= 500:
            err = errors.ServerError(message)
            err.retry_after = retry_after_of(exc)
            return err
        if status == 0:
            return errors.Unavailable(message)
        return errors.ProviderError(message)
    if isinstance(exc, CONNECTION_ERRORS):
        return errors.Unavailable(
            f"{what}: cannot reach the Kubernetes API: {_truncate(repr(exc))}"
        )
    return errors.ProviderError(f"{what}: {_truncate(repr(exc))}")


def error_kind(err: errors.ProviderError) -> str:
    """The metrics label of an error: its class name in snake case."""
    name = type(err).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class ApiCaller:
    """Every request goes through here: one token bucket, one shared pause.

    After a retryable failure (429, 5xx, connection error) all callers wait a
    jittered, growing pause (at least the server's Retry-After) before their
    next request, so a struggling or absent API server is not hammered; a call
    that would have to wait longer than ``max_wait`` fails at once instead.
    """

    def __init__(
        self,
        *,
        qps: float,
        burst: int,
        metrics: Metrics | None = None,
        backoff_base: float = 0.2,
        backoff_cap: float = 30.0,
        max_wait: float = 10.0,
        attempts: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bucket = TokenBucket(qps, burst, clock=clock)
        self._metrics = metrics
        self._backoff = Retry(backoff_base, backoff_cap)
        self._max_wait = max_wait
        self._attempts = attempts
        self._clock = clock
        self._not_before = 0.0
        self._last_error: errors.ProviderError | None = None

    async def before_request(self) -> None:
        """Wait out the shared pause, then for a token of the rate limit."""
        pause = self._not_before - self._clock()
        if pause > self._max_wait and self._last_error is not None:
            raise self._paused_error(pause)
        if pause > 0:
            await asyncio.sleep(pause)
        await self.bucket.acquire()

    def _paused_error(self, pause: float) -> errors.ProviderError:
        last = self._last_error
        message = f"Kubernetes API backing off for {pause:.1f}s after: {last}"
        if isinstance(last, errors.TooManyRequests):
            return errors.TooManyRequests(message, retry_after=pause)
        err: errors.ProviderError = (
            errors.ServerError(message)
            if isinstance(last, errors.ServerError)
            else errors.Unavailable(message)
        )
        err.retry_after = pause
        return err

    def record_success(self) -> None:
        if self._backoff.attempt:
            self._backoff.reset()
            self._last_error = None

    def record_failure(self, operation: str, err: errors.ProviderError) -> None:
        if self._metrics is not None:
            self._metrics.provider_errors.labels(operation=operation, kind=error_kind(err)).inc()
        if isinstance(err, RETRYABLE):
            now = self._clock()
            if now < self._not_before:
                # Already pausing: a request sent before the pause began failed
                # too. One episode, one step of the backoff (N concurrent 429s
                # must not pause for base * 2**N).
                self._not_before = max(self._not_before, now + (err.retry_after or 0.0))
            else:
                self._not_before = now + self._backoff.next_delay(at_least=err.retry_after or 0.0)
            self._last_error = err

    async def call(
        self,
        operation: str,
        what: str,
        request: Callable[[], Awaitable[T]],
        *,
        expected: tuple[type[errors.ProviderError], ...] = (),
    ) -> T:
        """Run ``request`` with pacing and a few retries of retryable failures.

        Errors in ``expected`` (e.g. NotFound on delete) are raised without
        being counted as API errors.
        """
        attempt = 0
        while True:
            attempt += 1
            await self.before_request()
            try:
                result = await request()
            except asyncio.CancelledError:
                raise
            except _CAUGHT as exc:
                err = translate(exc, what)
                if isinstance(err, expected):
                    self.record_success()
                    raise err from None
                self.record_failure(operation, err)
                if not isinstance(err, RETRYABLE) or attempt >= self._attempts:
                    raise err from None
                log.info(
                    "kubernetes_api_retry",
                    operation=operation,
                    what=what,
                    attempt=attempt,
                    error=str(err),
                )
                continue
            self.record_success()
            return result
