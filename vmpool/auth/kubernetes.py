"""ServiceAccount tokens, checked with a TokenReview (authentication.k8s.io/v1)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from vmpool.auth.cache import TokenCache, cache_until
from vmpool.auth.principal import AuthUnavailable, Principal, Unauthenticated

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
        reason = (getattr(status, "error", None) or "token rejected")[:200]
        raise Unauthenticated(f"token: {reason}")
    if audiences and not set(status.audiences or []) & set(audiences):
        raise Unauthenticated(f"token: not issued for audience {', '.join(audiences)}")
    user = status.user
    if user is None or not user.username:
        raise Unauthenticated("token: the TokenReview names no user")
    return Principal(user.username, tuple(user.groups or ()))


class TokenReviewer:
    def __init__(
        self,
        api_client: client.ApiClient,
        audiences: list[str],
        cache_ttl: float,
        *,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._api = client.AuthenticationV1Api(api_client)
        self._audiences = audiences
        self._ttl = cache_ttl
        self._cache = TokenCache()
        self._mono = mono
        self._wall = wall

    async def authenticate(self, token: str) -> Principal:
        now = self._mono()
        cached = self._cache.get(token, now)
        if cached is not None:
            return cached
        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=self._audiences or None),
        )
        try:
            review = await self._api.create_token_review(body, _request_timeout=5)
        except ApiException as err:
            log.warning("token review failed", status=err.status, reason=str(err.reason)[:200])
            raise AuthUnavailable(
                f"token review: the Kubernetes API answered {err.status}; retry later"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            log.warning("token review failed", error=repr(err)[:200])
            raise AuthUnavailable("token review: the Kubernetes API cannot be reached") from None
        principal = principal_of_review(review.status, self._audiences)
        self._cache.put(
            token,
            principal,
            cache_until(now, self._ttl, self._wall(), unverified_expiry(token)),
            now,
        )
        return principal


async def load_api_client(kubeconfig: str) -> client.ApiClient:
    """``kubeconfig`` if given, else in-cluster, else ``~/.kube/config``."""
    from kubernetes_asyncio import config
    from kubernetes_asyncio.config.config_exception import ConfigException

    configuration = client.Configuration()
    try:
        if kubeconfig:
            await config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except ConfigException:
                await config.load_kube_config(
                    client_configuration=configuration, persist_config=False
                )
    except (ConfigException, OSError) as err:
        raise ValueError(
            f"auth.kubernetes.kubeconfig: cannot load {kubeconfig or 'in-cluster or ~/.kube/config'}: "
            f"{str(err)[:200]}"
        ) from None
    return client.ApiClient(configuration)
