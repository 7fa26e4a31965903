"""The hand-written reply encoders write exactly what betterproto writes."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from vmpool.codec import SafeProtoCodec
from vmpool.fastwire import ENCODERS, built
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
    assert set(ENCODERS) == {
        api.LeaseResponse,
        api.ExtendToResponse,
        api.GetLeaseResponse,
        api.ReturnResponse,
    }
    empty = api.LeaseResponse()
    assert SafeProtoCodec().encode(empty, api.LeaseResponse) == bytes(empty)


requests = st.one_of(
    st.builds(
        api.LeaseRequest,
        pool=st.text(),
        expires=timestamps,
        service_tag=st.text(),
        reservation_id=st.none() | st.text(),
    ),
    st.builds(api.ReturnRequest, instance=st.text(), service_tag=st.text()),
    st.builds(
        api.ExtendToRequest,
        instance=st.text(),
        to=timestamps,
        service_tag=st.text(),
        extend_only=st.booleans(),
    ),
    st.builds(api.GetLeaseRequest, instance=st.text()),
)


def _fields(message: object) -> dict[str, object]:
    names = type(message)._betterproto.meta_by_field_name  # type: ignore[attr-defined]
    return {name: getattr(message, name) for name in names}


@settings(max_examples=500, deadline=None)
@given(request=requests, twice=st.booleans())
def test_decodes_as_betterproto_does(request: object, twice: bool) -> None:
    data = bytes(request)  # type: ignore[call-overload]
    if twice:
        data += data  # every field again: the last one wins
    kind = type(request)
    slow = kind().parse(data)
    fast = SafeProtoCodec().decode(data, kind)
    assert type(fast) is kind
    assert _fields(fast) == _fields(slow)
    assert bytes(fast) == bytes(slow)  # and it re-encodes the same


def test_absent_fields_decode_as_betterproto_leaves_them() -> None:
    codec = SafeProtoCodec()
    for kind in (api.LeaseRequest, api.ReturnRequest, api.ExtendToRequest, api.GetLeaseRequest):
        assert _fields(codec.decode(b"", kind)) == _fields(kind().parse(b""))


def test_built_messages_are_ordinary_betterproto_messages() -> None:
    expires = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    fast = built(
        api.LeaseResponse,
        lease=built(api.Lease, instance="vmp-1", pool="p", expires=expires, zone="z"),
    )
    slow = api.LeaseResponse(lease=api.Lease(instance="vmp-1", pool="p", expires=expires, zone="z"))
    assert fast == slow
    assert bytes(fast) == bytes(slow) == SafeProtoCodec().encode(fast, api.LeaseResponse)
    assert fast.lease.expires == expires
    assert SafeProtoCodec().encode(built(api.ReturnResponse), api.ReturnResponse) == b""
