"""The event loop `vmpool serve` runs on (the benchmark's floor server uses the same)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop."""
    return asyncio.run(main)
