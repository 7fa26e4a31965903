"""The fifo invariant on hand-made logs (the shape seen in a-sigkill when the
server was down longer than reservation_ttl)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests.chaos.harness import Call, Log
from tests.chaos.invariants import fifo

A, B = "aaaaaaaa-0000-0000-0000-000000000000", "bbbbbbbb-0000-0000-0000-000000000000"


def queued(rid: str, t0: float, position: int) -> Call:
    message = f'reservation {rid} is queued at position {position} of 9 in pool "beta"'
    return Call("Lease", t0, t0 + 0.01, "RESOURCE_EXHAUSTED", "beta", rid=rid, message=message)


def served(rid: str, t0: float, t1: float) -> Call:
    return Call("Lease", t0, t1, "OK", "beta", instance=f"vm-{rid[0]}", rid=rid)


def lease(rid: str, at: float) -> dict[str, Any]:
    return {"rid": rid, "leased_at": datetime.fromtimestamp(at, UTC)}


# A queues first; the server is down from t=3 to t=13, longer than the TTL, so
# at restart A's queue entry expires before its next call (which queues it
# again, at t=13.76, and waits to be served); B's call renewed B in time.
LOG = Log([queued(A, 0.8, 2), queued(B, 1.2, 7), served(B, 13.70, 13.74), served(A, 13.74, 15.3)])
LEASES = [lease(B, 13.73), lease(A, 15.32)]


def test_a_reservation_served_late_after_its_first_place_is_out_of_order() -> None:
    result = fifo(LOG, LEASES)
    assert result.ok is False
    assert "aaaaaaaa enqueued first" in result.detail


def test_a_reservation_queued_again_is_judged_from_its_new_place() -> None:
    result = fifo(LOG, LEASES, requeued={A: 13.76})
    # B is now the one queued first (its first answer came before A's new call).
    assert result.ok is True
    assert "2 served from the queue, 1 ordered pairs checked" in result.detail


def test_queued_again_before_the_other_was_first_seen_still_counts() -> None:
    # A's new place (t=13.76) is still before B's first call (t=14): A must come first.
    log = Log([queued(A, 0.8, 2), served(A, 13.74, 13.8), queued(B, 14.0, 1), served(B, 14.1, 16)])
    ok = fifo(log, [lease(A, 13.79), lease(B, 15.9)], requeued={A: 13.76})
    late = fifo(log, [lease(A, 18.0), lease(B, 15.9)], requeued={A: 13.76})
    assert ok.ok is True
    assert late.ok is False
