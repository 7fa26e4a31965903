"""What the watch bench's watchers read of each event: its type and time, from
its bytes (tests/bench/watch.py). Apart from the bench so that its unit test needs
none of the bench's own dependencies (numpy, matplotlib)."""

from __future__ import annotations

from vmpool.wire.fastwire import read_varint


def type_and_time(data: bytes) -> tuple[int, float]:
    """A LeaseEvent's type (field 3) and time (field 2, seconds) read from its
    bytes; other fields are skipped (each is a string, a Timestamp or the type)."""
    kind, seconds, nanos = 0, 0, 0
    pos, end = 0, len(data)
    while pos < end:
        key, pos = read_varint(data, pos)
        if key & 7 == 0:  # varint: the type is the only one
            value, pos = read_varint(data, pos)
            if key >> 3 == 3:
                kind = value
            continue
        length, pos = read_varint(data, pos)
        if key >> 3 == 2:  # Timestamp: seconds (1), nanos (2)
            inner, stop = pos, pos + length
            while inner < stop:
                tkey, inner = read_varint(data, inner)
                value, inner = read_varint(data, inner)
                if tkey >> 3 == 1:
                    seconds = value
                elif tkey >> 3 == 2:
                    nanos = value
        pos += length
    return kind, seconds + nanos / 1e9
