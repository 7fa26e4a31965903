"""Exponential backoff with jitter: the one module for it.

``Backoff`` keeps one failure count per key (a pool, a VM name) and says until
when a key is blocked; ``Retry`` is a single sequence for one retrying loop (a
watch, an API client). Both take times from an injected monotonic clock and
draw delays the same way: between half and all of min(cap, base * 2**n), so a
dead API is never hammered and many clients do not retry in step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

Monotonic = Callable[[], float]


def backoff_ceiling(failures: int, base: float, cap: float) -> float:
    """min(cap, base * 2**(failures - 1)): the longest wait after the
    ``failures``-th failure in a row (1 = the first)."""
    return min(cap, base * 2.0 ** max(failures - 1, 0))


def backoff_delay(
    failures: int, base: float, cap: float, rng: Callable[[], float] = random.random
) -> float:
    """The wait after the ``failures``-th failure in a row (1 = the first)."""
    ceiling = backoff_ceiling(failures, base, cap)
    return ceiling / 2 + float(rng()) * ceiling / 2


@dataclass
class _State:
    failures: int = 0
    until: float = 0.0


class Backoff:
    """Per-key backoff: ``failed`` records a failure and blocks the key for a while."""

    def __init__(
        self,
        base: float = 2.0,
        cap: float = 300.0,
        *,
        clock: Monotonic = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base = base
        self.cap = cap
        self._clock = clock
        self._rng = rng
        self._states: dict[str, _State] = {}

    def failed(self, key: str, at_least: float = 0.0) -> float:
        """Record a failure; returns the delay before the next try."""
        state = self._states.setdefault(key, _State())
        state.failures += 1
        delay = max(backoff_delay(state.failures, self.base, self.cap, self._rng), at_least)
        state.until = self._clock() + delay
        return delay

    def succeeded(self, key: str) -> None:
        self._states.pop(key, None)

    forget = succeeded

    def blocked(self, key: str) -> bool:
        state = self._states.get(key)
        return state is not None and self._clock() < state.until

    def until(self, key: str) -> float | None:
        """Monotonic time before which ``key`` is blocked, if it has failed."""
        state = self._states.get(key)
        return None if state is None else state.until

    def failures(self, key: str) -> int:
        state = self._states.get(key)
        return state.failures if state else 0


def _no_jitter() -> float:
    return 1.0


class Retry:
    """One retrying loop's backoff: try n waits ``backoff_delay(n + 1, ...)``;
    with ``jitter=False`` exactly ``backoff_ceiling(n + 1, ...)`` (one client of
    its own server: the database connection of this process)."""

    def __init__(
        self,
        base: float,
        cap: float,
        *,
        rng: Callable[[], float] = random.random,
        jitter: bool = True,
    ) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng if jitter else _no_jitter
        self.attempt = 0

    def next_delay(self, at_least: float = 0.0) -> float:
        """The wait before the next try; ``at_least`` honours a server's Retry-After."""
        self.attempt += 1
        return max(backoff_delay(self.attempt, self.base, self.cap, self._rng), at_least)

    def reset(self) -> None:
        self.attempt = 0
