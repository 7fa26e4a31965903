"""The one stop signal of a server process (SIGTERM, SIGINT)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import structlog

log = structlog.get_logger("vmpool")


def stop_on_signals(
    loop: asyncio.AbstractEventLoop, on_forced_exit: Callable[[], None] | None = None
) -> asyncio.Event:
    """The one stop signal: set by SIGTERM/SIGINT; a second signal exits at once,
    after ``on_forced_exit`` (what must not outlive the process: os._exit runs no
    atexit and no finally, e.g. the demo's embedded PostgreSQL)."""
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting at once")
            if on_forced_exit is not None:
                try:
                    on_forced_exit()
                except Exception as err:  # exit regardless
                    log.error("cleanup before the forced exit failed", error=repr(err))
            os._exit(1)
        log.info("shutting down")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return stop
