"""Loaded into `vmpool serve` by `python -m tests.bench.gcshare` (PYTHONPATH):
the collector's time by generation, written to VMPOOL_GCPROBE_OUT every 0.5 s."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from typing import Any

_started = [0.0]
_seconds = [0.0, 0.0, 0.0]
_count = [0, 0, 0]


def _callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    generation = info["generation"]
    _seconds[generation] += time.perf_counter() - _started[0]
    _count[generation] += 1


def _write(path: str) -> None:
    while True:
        time.sleep(0.5)
        state = {"seconds": _seconds, "count": _count, "cpu": time.process_time()}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)


if os.environ.get("VMPOOL_GCPROBE_OUT"):
    gc.callbacks.append(_callback)
    threading.Thread(target=_write, args=(os.environ["VMPOOL_GCPROBE_OUT"],), daemon=True).start()
