"""After gctune.settle() the collector skips start-up's objects, is called less
often, and still frees garbage cycles made later."""

from __future__ import annotations

import gc
import weakref

from vmpool.core import gctune


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_settle_freezes_start_up_and_cycles_are_still_collected() -> None:
    before = gc.get_threshold()
    gc.unfreeze()
    try:
        gctune.settle()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (gctune.GEN0_THRESHOLD, before[1], before[2])
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: refcounting alone never frees it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
        frozen = gc.get_freeze_count()
        gctune.settle()  # once per process
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
