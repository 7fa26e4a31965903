"""Exponential backoff with jitter, per key (a pool, a VM name)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    until: float = 0.0


class Backoff:
    def __init__(self, base: float = 2.0, cap: float = 300.0, jitter: float = 0.2) -> None:
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self._states: dict[str, _State] = {}

    def failed(self, key: str, now: float | None = None, at_least: float = 0.0) -> float:
        """Record a failure; returns the delay before the next try."""
        now = time.monotonic() if now is None else now
        state = self._states.setdefault(key, _State())
        state.failures += 1
        delay: float = min(self.cap, self.base * 2.0 ** (state.failures - 1))
        delay *= 1 + random.uniform(-self.jitter, self.jitter)
        delay = max(delay, at_least)
        state.until = now + delay
        return delay

    def succeeded(self, key: str) -> None:
        self._states.pop(key, None)

    def blocked(self, key: str, now: float | None = None) -> bool:
        state = self._states.get(key)
        if state is None:
            return False
        return (time.monotonic() if now is None else now) < state.until

    def failures(self, key: str) -> int:
        state = self._states.get(key)
        return state.failures if state else 0

    def forget(self, key: str) -> None:
        self._states.pop(key, None)
