"""The garbage collector for a long-running server.

Measured under load (docs/performance.md): with the defaults a full collection
re-read every object start-up made (modules, config, clients) every few
seconds, 80-150 ms each with all calls stopped, and the youngest generation
was collected every ~60 calls. After start-up those objects live as long as
the process, so they are frozen out of the collector's reach, and the
youngest generation is collected less often (refcounting frees almost all of
a call's objects; only cycles wait for the collector)."""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000  # allocations between collections of the youngest generation (default 700)


def settle() -> None:
    """Call once start-up is done: collect, then freeze what is left and raise
    the youngest generation's threshold (the older ones keep theirs). Once per
    process: a second server in one process (tests) changes nothing."""
    if gc.get_freeze_count():
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, older, oldest)
