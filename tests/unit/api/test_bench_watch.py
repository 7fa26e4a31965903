"""The watch bench's watchers read only each event's type and time from its
bytes (tests.bench.event_bytes.type_and_time); they must read what betterproto does."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings

from tests.bench.event_bytes import type_and_time
from tests.unit.api.test_watch_encoding import events
from vmpool.api.watch import encode_shared
from vmpool.domain.watch import Event
from vmpool.proto.vmpool.admin import v1 as adm


@settings(max_examples=200, deadline=None)
@given(e=events)
def test_type_and_time_read_from_the_bytes_are_betterprotos(e: Event) -> None:
    data = encode_shared(e)
    got = adm.LeaseEvent().parse(data)
    kind, at = type_and_time(data)
    assert kind == got.type
    assert abs(at - got.time.timestamp()) < 1e-4  # two roundings to a float of up to 2.5e11 s


def test_a_heartbeat_written_by_betterproto_reads_as_one() -> None:
    now = datetime(2026, 12, 7, 23, 0, 0, 250_000, tzinfo=UTC)
    beat = adm.LeaseEvent(cursor="c", type=adm.LeaseEventType.HEARTBEAT, time=now)
    assert type_and_time(bytes(beat)) == (adm.LeaseEventType.HEARTBEAT, now.timestamp())
