"""ServiceAccount tokens, checked with a TokenReview (authentication.k8s.io/v1)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from vmpool.auth.cache import MAX_ENTRIES, TokenCache, cache_until, token_key
from vmpool.auth.principal import AuthUnavailable, Principal, Unauthenticated
from vmpool.core.echo import echo

log = structlog.get_logger("vmpool.auth")

Review = Callable[[Any], Awaitable[Any]]


def unverified_expiry(token: str) -> float | None:
    """The `exp` a ServiceAccount token (a JWT) claims; only to bound the cache,
    after the API server said the token is valid."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


def principal_of_review(status: Any, audiences: list[str]) -> Principal:
    """The caller a TokenReview status names; Unauthenticated when it does not."""
    if status is None or not status.authenticated:
        reason = echo(getattr(status, "error", None) or "token rejected", 200)
        raise Unauthenticated(f"token: {reason}")
    if audiences and not set(status.audiences or []) & set(audiences):
        raise Unauthenticated(f"token: not issued for audience {', '.join(audiences)}")
    user = status.user
    if user is None or not user.username:
        raise Unauthenticated("token: the TokenReview names no user")
    return Principal(user.username, tuple(user.groups or ()))


REJECTED_TTL = 10.0  # a refused token is refused again without asking, for this long


class TokenReviewer:
    """Checks tokens with TokenReviews: accepted ones cached (``cache_ttl``,
    never past their expiry), refused ones for REJECTED_TTL, and concurrent
    checks of one token share a single review."""

    def __init__(
        self,
        api_client: client.ApiClient | None,
        audiences: list[str],
        cache_ttl: float,
        *,
        review: Review | None = None,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if review is None:
            api = client.AuthenticationV1Api(api_client)

            async def review(body: Any) -> Any:
                return await api.create_token_review(body, _request_timeout=5)

        self._review = review
        self._audiences = audiences
        self._ttl = cache_ttl
        self._cache = TokenCache()
        self._rejected: dict[str, tuple[float, str]] = {}
        self._inflight: dict[str, asyncio.Future[Principal]] = {}
        self._mono = mono
        self._wall = wall
        self.reviews = 0

    async def authenticate(self, token: str) -> Principal:
        now = self._mono()
        cached = self._cache.get(token, now)
        if cached is not None:
            return cached
        key = token_key(token)
        refused = self._rejected.get(key)
        if refused is not None and refused[0] > now:
            raise Unauthenticated(refused[1])
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Principal] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            principal = await self._check(token, now)
        except BaseException as err:
            # Callers sharing this review get the same answer; a cancelled
            # review is, for them, one to retry.
            shared = err if isinstance(err, Exception) else AuthUnavailable("token review: retry")
            future.set_exception(shared)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            future.set_result(principal)
            return principal
        finally:
            del self._inflight[key]

    async def _check(self, token: str, now: float) -> Principal:
        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=self._audiences or None),
        )
        self.reviews += 1
        try:
            review = await self._review(body)
        except ApiException as err:
            log.warning("token review failed", status=err.status, reason=echo(str(err.reason), 200))
            raise AuthUnavailable(
                f"token review: the Kubernetes API answered {err.status}; retry later"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            log.warning("token review failed", error=echo(repr(err), 200))
            raise AuthUnavailable("token review: the Kubernetes API cannot be reached") from None
        try:
            principal = principal_of_review(review.status, self._audiences)
        except Unauthenticated as err:
            if len(self._rejected) >= MAX_ENTRIES:
                self._rejected.clear()
            self._rejected[token_key(token)] = (now + REJECTED_TTL, str(err))
            raise
        self._cache.put(
            token,
            principal,
            cache_until(now, self._ttl, self._wall(), unverified_expiry(token)),
            now,
        )
        return principal


async def load_api_client(kubeconfig: str) -> client.ApiClient:
    """``kubeconfig`` if given, else in-cluster, else ``~/.kube/config``."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            await kube_config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
        else:
            try:
                kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except ConfigException:
                await kube_config.load_kube_config(
                    client_configuration=configuration, persist_config=False
                )
    except (ConfigException, OSError) as err:
        raise ValueError(
            f"auth.kubernetes.kubeconfig: cannot load {kubeconfig or 'in-cluster or ~/.kube/config'}: "
            f"{echo(str(err), 200)}"
        ) from None
    return client.ApiClient(configuration)
