"""The hand-written reply encoders write exactly what betterproto writes."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from vmpool.codec import SafeProtoCodec
from vmpool.fastwire import ENCODERS
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api

timestamps = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)
).map(lambda d: d.replace(tzinfo=UTC))


@settings(max_examples=500, deadline=None)
@given(
    reply=st.sampled_from([api.LeaseResponse, api.ExtendToResponse, api.GetLeaseResponse]),
    instance=st.text(),
    pool=st.text(),
    zone=st.text(),
    expires=timestamps,
)
def test_same_bytes_as_betterproto(
    reply: type, instance: str, pool: str, zone: str, expires: datetime
) -> None:
    message = reply(lease=api.Lease(instance=instance, pool=pool, expires=expires, zone=zone))
    fast = SafeProtoCodec().encode(message, reply)
    assert fast == bytes(message)
    assert reply().parse(fast).lease.expires == expires


def test_anything_unusual_takes_the_general_path() -> None:
    assert set(ENCODERS) == {api.LeaseResponse, api.ExtendToResponse, api.GetLeaseResponse}
    empty = api.LeaseResponse()
    assert SafeProtoCodec().encode(empty, api.LeaseResponse) == bytes(empty)
