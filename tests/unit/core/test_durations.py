from __future__ import annotations

from datetime import timedelta

import pytest

from vmpool.core.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("8h", 28800),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("2d", 172800),
        ("1.5h", 5400),
    ],
)
def test_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "m", "10x", "1h 30m", "-5m", "5m3"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_round_trips() -> None:
    for text in ["1h30m", "45s", "8h", "1m0s500ms"]:
        assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
    assert format_duration(timedelta(0)) == "0s"
