"""The decisions of `lease --wait`: pacing, queue positions, what people see."""

from __future__ import annotations

import io
import json

from tests.clocks import ManualClock
from vmpool.cli.wait import (
    MAX_BACKOFF,
    MIN_GAP,
    PLAIN_EVERY,
    Place,
    Progress,
    queue_place,
    retry_delay,
)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_queue_place_from_the_servers_message() -> None:
    msg = 'reservation 1b4e-... is queued at position 2 of 5 in pool "alpha"'
    assert queue_place(msg) == Place(2, 5, "alpha")
    assert queue_place('pool "alpha": no free instance') is None


def test_calls_that_fail_at_once_back_off_to_a_few_seconds() -> None:
    delays = [retry_delay(n, 0.01) for n in range(1, 10)]
    assert delays[0] >= MIN_GAP * 0.9
    assert delays == sorted(delays) and max(delays) == MAX_BACKOFF
    # So an 8 s wait on a typo is a handful of calls, not thousands.
    spent, calls = 0.0, 0
    while spent < 8:
        calls += 1
        spent += retry_delay(calls, 0.01)
    assert calls <= 5


def test_a_call_that_waited_server_side_goes_again_at_once() -> None:
    assert retry_delay(0, 20.0) == 0.0
    assert retry_delay(0, 0.2) == MIN_GAP - 0.2, "never two calls within MIN_GAP"


def test_terminal_shows_one_line_redrawn_in_place() -> None:
    out, clock = Tty(), ManualClock(100.0)
    p = Progress(out, 60, clock, as_json=False, rid="r")
    p.tick()
    assert out.getvalue() == "", "nothing before the first answer"
    p.set('queued at position 2 of 3 in pool "a"', Place(2, 3, "a"))
    clock.now += 5
    p.tick()
    p.done()
    text = out.getvalue()
    assert "\n" not in text and text.count("\r\x1b[2K") == 3
    assert "position 2 of 3" in text and "waited 5s, 55s left" in text


def test_piped_prints_a_line_only_on_change_or_now_and_then() -> None:
    out, clock = io.StringIO(), ManualClock(100.0)
    p = Progress(out, 600, clock, as_json=False, rid="r")
    p.set("queued at position 2 of 3", Place(2, 3, "a"))
    for _ in range(10):
        clock.now += 1
        p.tick()
        p.set("queued at position 2 of 3", Place(2, 3, "a"))
    assert len(out.getvalue().splitlines()) == 1
    p.set("queued at position 1 of 3", Place(1, 3, "a"))
    clock.now += PLAIN_EVERY
    p.tick()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[-1].startswith("waiting: queued at position 1 of 3; waited 40s")


def test_json_progress_lines_are_objects() -> None:
    out, clock = Tty(), ManualClock(100.0)  # a terminal, but --output json: still plain lines
    p = Progress(out, 60, clock, as_json=True, rid="r-1")
    p.set("queued", Place(1, 2, "a"))
    event = json.loads(out.getvalue())
    assert event == {
        "event": "waiting",
        "state": "queued",
        "reservation_id": "r-1",
        "elapsed_seconds": 0,
        "remaining_seconds": 60,
        "position": 1,
        "length": 2,
        "pool": "a",
    }
