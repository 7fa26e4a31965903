"""Go-style duration strings (``90s``, ``30m``, ``1h30m``) to and from timedelta."""

from __future__ import annotations

import re
from datetime import timedelta

from vmpool.core.echo import echo

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> timedelta:
    """Parse ``"1h30m"``-style text; raise ValueError with the offending text."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = 0.0
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(s):
        raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 30m, 8h, 1h30m)")
    try:
        return timedelta(seconds=total)
    except OverflowError:  # e.g. 99999999999999999999h: out of timedelta's range
        raise ValueError(f"duration {echo(text, 32)!r} is too long") from None


def format_duration(value: timedelta) -> str:
    """The shortest exact Go-style text for a duration (``1h30m``, ``45s``)."""
    ms = round(value.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    out = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        n, ms = divmod(ms, size)
        if n:
            out.append(f"{n}{unit}")
    if ms:
        out.append(f"{ms}ms")
    return "".join(out)
