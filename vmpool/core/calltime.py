"""Time a call spends waiting on purpose (a Lease with x-vmpool-wait), kept apart
from its own latency so a slow-Lease alert does not fire whenever someone queues."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

_waited: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("waited", default=None)


def start() -> list[float]:
    """Begin counting for the current call; the one-item list holds the seconds waited."""
    box = [0.0]
    _waited.set(box)
    return box


@contextmanager
def waiting() -> Iterator[None]:
    """Count the time inside as waited (outside a counted call: not counted)."""
    began = time.perf_counter()
    try:
        yield
    finally:
        box = _waited.get()
        if box is not None:
            box[0] += time.perf_counter() - began
