"""A small bounded cache of verified tokens, keyed by a hash of the token."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from vmpool.auth.principal import Principal

MAX_ENTRIES = 10_000


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenCache:
    """Entries live until their own expiry (monotonic seconds); oldest out when full."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._max = max_entries

    def get(self, token: str, now: float) -> Principal | None:
        key = token_key(token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, token: str, principal: Principal, until: float, now: float) -> None:
        if until <= now:
            return
        self._entries[token_key(token)] = (until, principal)
        self._entries.move_to_end(token_key(token))
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def cache_until(now_mono: float, ttl: float, now_wall: float, token_exp: float | None) -> float:
    """A verified token is cached for ``ttl``, never past its own expiry."""
    until = now_mono + ttl
    if token_exp is not None:
        until = min(until, now_mono + (token_exp - now_wall))
    return until
