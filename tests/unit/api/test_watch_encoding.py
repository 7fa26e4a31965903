"""WatchLeases' shared encoding of an event is the bytes betterproto writes
for the same LeaseEvent (the hand-written encoder replaced it for speed)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from vmpool.api.watch import encode_shared, message
from vmpool.core.instant import Instant
from vmpool.domain.watch import KINDS, Cursor, Event
from vmpool.proto.vmpool.admin import v1 as adm

texts = st.text(max_size=40)
times = st.datetimes(
    min_value=datetime(1970, 1, 1, 0, 0, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)
).map(lambda d: d.replace(tzinfo=UTC))
instants = st.integers(1, 253402300799 * 10**9 + 999_999_999).map(Instant)
events = st.builds(
    Event,
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1),
    times,
    st.sampled_from(KINDS),
    texts,
    texts,
    texts,
    texts,
    texts,
    st.one_of(st.none(), st.uuids()),
    st.one_of(st.none(), instants),
    reason=texts,
)


@settings(max_examples=300, deadline=None)
@given(e=events)
def test_shared_encoding_is_what_betterproto_writes(e: Event) -> None:
    assert encode_shared(e) == bytes(message(e, Cursor(e.pos, e.seq)))


def test_an_event_reads_back() -> None:
    expires = Instant(1_790_000_000_123_456_789)
    e = Event(
        7,
        9,
        7,
        datetime(2026, 12, 7, 20, 0, 1, 5, tzinfo=UTC),
        "leased",
        "vm-1",
        "p",
        "t",
        "alice",
        "alice",
        uuid.UUID(int=5),
        expires,
    )
    got = adm.LeaseEvent().parse(encode_shared(e))
    assert got.type == adm.LeaseEventType.LEASED
    assert (got.instance, got.pool, got.service_tag, got.principal) == ("vm-1", "p", "t", "alice")
    assert got.time == datetime(2026, 12, 7, 20, 0, 1, 5, tzinfo=UTC)
    assert got.cursor == Cursor(7, 9).encode()
    assert got.reservation_id == str(uuid.UUID(int=5))
