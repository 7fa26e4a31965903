"""OIDC ID tokens (JWTs) verified against a JWKS with PyJWT: signature, issuer,
audience, expiry. Keys come from jwks_url (cached; fetched again for an unknown
key id, at most every REFRESH_GAP seconds) or from jwks_file."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import structlog

from vmpool.auth.principal import AuthUnavailable, Principal, Unauthenticated
from vmpool.config.schema import JwtAuthConfig
from vmpool.core.echo import echo

log = structlog.get_logger("vmpool.auth")

REFRESH_GAP = 10.0  # an unknown kid flood costs the identity provider one fetch per gap
MAX_AGE = 3600.0  # keys are re-fetched at least hourly (rotation)
ALGORITHMS = [
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]
MAX_JWKS_BYTES = 1 << 20


def parse_jwks(data: Any) -> dict[str, jwt.PyJWK]:
    """Key id -> key; keys without a usable algorithm are skipped."""
    try:
        keyset = jwt.PyJWKSet.from_dict(data)
    except jwt.PyJWTError as err:
        raise ValueError(f"not a JWKS: {err}") from None
    return {k.key_id or "": k for k in keyset.keys}


def claims_principal(claims: dict[str, Any], username_claim: str, groups_claim: str) -> Principal:
    name = claims.get(username_claim)
    if not isinstance(name, str) or not name:
        raise Unauthenticated(f"token: no {username_claim!r} claim")
    groups = claims.get(groups_claim, []) if groups_claim else []
    if isinstance(groups, str):
        groups = [groups]
    if not isinstance(groups, list):
        groups = []
    return Principal(name, tuple(g for g in groups if isinstance(g, str)))


class JwtVerifier:
    def __init__(
        self,
        config: JwtAuthConfig,
        *,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._mono = mono
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _load(self) -> dict[str, jwt.PyJWK]:
        cfg = self._config
        try:
            if cfg.jwks_file:
                text = await asyncio.to_thread(Path(cfg.jwks_file).read_text)
                return parse_jwks(json.loads(text))
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
            async with self._session.get(cfg.jwks_url) as resp:
                if resp.status != 200:
                    raise AuthUnavailable(f"jwks_url: answered HTTP {resp.status}; retry later")
                body = await resp.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise AuthUnavailable("jwks_url: key set larger than 1 MiB")
            return parse_jwks(json.loads(body))
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            log.warning("jwks fetch failed", error=echo(repr(err), 200))
            raise AuthUnavailable("jwks: the key set cannot be fetched; retry later") from None
        except ValueError as err:  # bad JSON or not a key set
            log.warning("jwks unusable", error=echo(str(err), 200))
            raise AuthUnavailable("jwks: the key set is not usable; retry later") from None

    async def _key(self, kid: str) -> jwt.PyJWK:
        now = self._mono()
        stale = self._fetched_at is None or now - self._fetched_at > MAX_AGE
        unknown = kid not in self._keys
        may_refresh = self._fetched_at is None or now - self._fetched_at >= REFRESH_GAP
        if stale or (unknown and may_refresh):
            try:
                self._keys = await self._load()
                self._fetched_at = now
            except AuthUnavailable:
                if kid not in self._keys:
                    raise
                # A known key still verifies while the provider is briefly down.
        key = self._keys.get(kid)
        if key is None and not kid and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        if key is None:
            raise Unauthenticated(f"token: signed with unknown key {echo(kid)!r}")
        return key

    async def authenticate(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("token: not a JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthenticated(f"token: algorithm {echo(str(alg), 16)!r} is not accepted")
        kid = header.get("kid") or ""
        if not isinstance(kid, str):
            raise Unauthenticated("token: kid is not a string")
        key = await self._key(kid)
        cfg = self._config
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=cfg.audiences or None,
                issuer=cfg.issuer,
                leeway=30,
                options={"require": ["exp", "iss"], "verify_aud": bool(cfg.audiences)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token: expired") from None
        except jwt.PyJWTError as err:
            raise Unauthenticated(f"token: {echo(str(err), 200)}") from None
        return claims_principal(claims, cfg.username_claim, cfg.groups_claim)
