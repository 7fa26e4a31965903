"""The JSON line processor (logs.JsonLine) writes what structlog's chain wrote:
the same keys in the same order with the same values, the timestamp in ISO 8601
UTC, an exception as its formatted traceback."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import structlog

from vmpool.ops.logs import JsonLine

CHAIN = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.format_exc_info,
    structlog.processors.JSONRenderer(),
]


def chain(method: str, event: dict[str, Any]) -> str:
    out: Any = event
    for processor in CHAIN:
        out = processor(None, method, out)
    assert isinstance(out, str)
    return out


def without_time(line: str) -> tuple[list[str], dict[str, Any]]:
    record = json.loads(line)
    record.pop("timestamp")
    return list(json.loads(line)), record


class Odd:
    def __repr__(self) -> str:
        return "<odd>"


def test_same_keys_order_and_values_as_structlogs_chain() -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(principal="alice", pool="bound", groups=["a", "b"])
    line = JsonLine()
    try:
        events = [
            ("info", {"event": "rpc", "method": "Lease", "code": "OK", "duration_ms": 1.5}),
            ("info", {"event": "audit", "pool": "given wins over bound", "odd": Odd()}),
            ("warn", {"event": "w", "when": datetime(2027, 1, 1, tzinfo=UTC)}),
            ("exception", {"event": "e", "exc_info": ValueError("boom")}),
        ]
        for method, event in events:
            assert without_time(line(None, method, dict(event))) == without_time(
                chain(method, dict(event))
            )
    finally:
        structlog.contextvars.clear_contextvars()
    record = json.loads(line(None, "error", {"event": "e", "exc_info": ValueError("boom")}))
    assert "ValueError: boom" in record["exception"] and record["level"] == "error"


def test_timestamp_is_iso_utc_to_the_microsecond() -> None:
    line = JsonLine()
    for now in (0.0, 1.999999, 1_700_000_000.5, 1_800_000_000.25):
        stamp = line.timestamp(now)
        assert stamp.endswith("Z")
        parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert abs(parsed.timestamp() - now) < 2e-6, (stamp, now)
    # Within one second only the fraction changes; the next second is formatted anew.
    assert line.timestamp(1_800_000_000.5) == "2027-01-15T08:00:00.500000Z"
    assert line.timestamp(1_800_000_001.0) == "2027-01-15T08:00:01.000000Z"
