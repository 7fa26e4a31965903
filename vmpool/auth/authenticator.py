"""One call's credentials -> its Caller, for the configured auth.mode."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import Any, Protocol

from vmpool.auth.caller import Caller
from vmpool.auth.mtls import identity_of
from vmpool.auth.policy import grant_for
from vmpool.auth.principal import ANONYMOUS, Principal, Unauthenticated
from vmpool.auth.tokens import bearer_token
from vmpool.config.schema import Config

MAX_CALLERS = 10_000  # principals whose grant is kept; then the cache starts again


class TokenVerifier(Protocol):
    async def authenticate(self, token: str) -> Principal: ...


def is_loopback(peer: Any) -> bool:
    """Whether a peer address (host, port, ...) is a loopback address."""
    if not isinstance(peer, tuple) or not peer:
        return False
    return _loopback_host(str(peer[0]))


@functools.lru_cache(maxsize=1024)
def _loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class Authenticator:
    def __init__(self, config: Config, verifier: TokenVerifier | None = None) -> None:
        self._config = config
        self._mode = config.auth.mode
        self._verifier = verifier
        if self._mode in ("kubernetes", "jwt") and verifier is None:
            raise ValueError(f"auth.mode {self._mode} needs a token verifier")
        # auth.mode none: two possible callers, decided once (the hot path).
        self._anonymous = {
            local: Caller(
                ANONYMOUS, grant_for(ANONYMOUS, config.auth, config.limits, loopback=local)
            )
            for local in (False, True)
        }
        # A verified principal's Caller: the policy is read once per principal, not per call.
        self._callers: dict[tuple[Principal, bool], Caller] = {}

    @property
    def needs_cert(self) -> bool:
        return self._mode == "mtls"

    async def principal(
        self, headers: Iterable[tuple[str, Any]], cert: dict[str, Any] | None
    ) -> Principal:
        if self._mode == "none":
            return ANONYMOUS
        if self._mode == "mtls":
            return identity_of(cert)
        token = bearer_token(headers)
        if token is None:
            raise Unauthenticated(
                "authorization: a Bearer token is required (or the auth-proxy cookie)"
            )
        assert self._verifier is not None
        return await self._verifier.authenticate(token)

    async def authenticate(
        self, headers: Iterable[tuple[str, Any]], peer: Any, cert: dict[str, Any] | None
    ) -> Caller:
        if self._mode == "none":
            return self._anonymous[is_loopback(peer)]
        principal = await self.principal(headers, cert)
        local = is_loopback(peer)
        known = self._callers.get((principal, local))
        if known is not None:
            return known
        grant = grant_for(principal, self._config.auth, self._config.limits, loopback=local)
        if len(self._callers) >= MAX_CALLERS:
            self._callers.clear()
        who = self._callers[(principal, local)] = Caller(principal, grant)
        return who
