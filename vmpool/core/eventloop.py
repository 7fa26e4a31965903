"""The event loop `vmpool serve` runs on (the benchmark's floor server uses the same).

uvloop when it is installed (a dependency; docs/performance.md has its
numbers), the standard library's loop otherwise or with VMPOOL_EVENT_LOOP=asyncio.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for the standard library's loop."""
    if os.environ.get("VMPOOL_EVENT_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop  # lazy: optional at run time: the plain loop is the fallback
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def name() -> str:
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop (uvloop when available)."""
    factory = loop_factory()
    if factory is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
