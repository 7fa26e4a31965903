"""WatchLeases' pure rules: cursors, scopes, the lead time, and the CLI's lines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vmpool.cli.watch import ago, line
from vmpool.domain.watch import (
    BadCursor,
    Cursor,
    Event,
    Scope,
    Snapshot,
    expiring_lead_s,
    parse_cursor,
    scope_for,
)
from vmpool.proto.vmpool.admin import v1 as adm

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def event(**kw: object) -> Event:
    base: dict[str, object] = dict(
        pos=10, seq=3, txid=9, at=NOW, kind="leased", instance="vm-1", pool="p",
        service_tag="ci", principal="alice", cause="alice", reservation_id=None, expires=None,
    )  # fmt: skip
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def test_cursors_round_trip_and_order() -> None:
    plain = Cursor(2**40 + 5, 77)
    assert parse_cursor(plain.encode()) == plain
    snap = Cursor(100, 1, Snapshot(90, 120, frozenset({95, 101})))
    back = parse_cursor(snap.encode())
    assert back.snapshot == snap.snapshot and (back.pos, back.seq) == (100, 1)
    assert Cursor(1, 9) < Cursor(2, 0) < Cursor(2, 1)


@pytest.mark.parametrize(
    "text", ["", "x", "not a cursor!", "AAAA", "A" * 5000, "A" * 13000, "////"]
)
def test_anything_else_is_not_a_cursor(text: str) -> None:
    with pytest.raises(BadCursor):
        parse_cursor(text)


@pytest.mark.parametrize(
    "cursor", [Cursor(2**63, 0), Cursor(1, 2**63), Cursor(1, 0, Snapshot(0, 2**63))]
)
def test_numbers_beyond_the_databases_bigint_are_not_a_cursor(cursor: Cursor) -> None:
    with pytest.raises(BadCursor):
        parse_cursor(cursor.encode())
    top = Cursor(2**63 - 1, 2**63 - 1)
    assert parse_cursor(top.encode()) == top


def test_a_snapshot_stream_skips_what_its_snapshot_saw_until_past_its_xmax() -> None:
    snap = Snapshot(xmin=100, xmax=110, xip=frozenset({103}))
    c = Cursor(100, 0, snap)
    assert c.skips(105, 99) and c.skips(105, 104)  # committed before the snapshot
    assert not c.skips(105, 103)  # in progress then: not seen
    assert not c.skips(105, 112)  # began after
    assert c.after(110, 5).snapshot is snap
    assert c.after(111, 1).snapshot is None  # nothing it saw can come later


def test_scopes() -> None:
    admin = scope_for(
        admin=True, authenticated=True, principal="root", service_tag=None,
        principal_filter="", pool="", instance="",
    )  # fmt: skip
    assert admin == Scope() and admin.sees(event())
    mine = scope_for(
        admin=False, authenticated=True, principal="alice", service_tag=None,
        principal_filter="", pool="", instance="",
    )  # fmt: skip
    assert mine.sees(event()) and not mine.sees(event(principal="bob"))
    anon = scope_for(
        admin=False, authenticated=False, principal="anonymous", service_tag=None,
        principal_filter="", pool="", instance="",
    )  # fmt: skip
    assert anon.service_tag == ""  # no auth: the tag is the owner; unset is the empty tag
    assert not anon.sees(event(principal="anonymous"))
    assert anon.sees(event(principal="anonymous", service_tag=""))
    nosy = scope_for(
        admin=False, authenticated=True, principal="alice", service_tag=None,
        principal_filter="bob", pool="", instance="",
    )  # fmt: skip
    assert not nosy.sees(event()) and not nosy.sees(event(principal="bob"))


def test_lead_times() -> None:
    assert expiring_lead_s(0) == 300
    assert expiring_lead_s(-1) is None
    assert expiring_lead_s(10**9) == 7 * 24 * 3600


def test_cli_lines_are_aligned_with_relative_times() -> None:
    assert ago(NOW, NOW) == "now"
    assert ago(NOW - timedelta(seconds=3), NOW) == "3s ago"
    assert ago(NOW + timedelta(minutes=4, seconds=10), NOW) == "in 4m10s"
    a = line(
        adm.LeaseEvent(
            time=NOW, type=adm.LeaseEventType.LEASED, instance="vm-1", pool="small",
            service_tag="ci", owner_principal="anonymous", principal="anonymous",
            expires=NOW + timedelta(minutes=10),
        ),
        NOW,
    )  # fmt: skip
    b = line(
        adm.LeaseEvent(
            time=NOW - timedelta(seconds=5), type=adm.LeaseEventType.STOPPED,
            instance="vm-22", pool="small", service_tag="", owner_principal="anonymous",
            principal="root", reason="StopLease",
        ),
        NOW,
    )  # fmt: skip
    assert "LEASED" in a and "expires in 10m00s" in a
    assert "by root" in b and '""' in b
    assert a.index("vm-1") == b.index("vm-22")  # columns line up
