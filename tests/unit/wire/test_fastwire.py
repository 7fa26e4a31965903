"""The hand-written reply encoder writes what protobuf writes, to the nanosecond;
the request decoders read what protobuf reads (tests/fuzz/test_wire_differential.py
checks that on arbitrary bytes)."""

from __future__ import annotations

import dataclasses
import typing
from datetime import UTC, datetime

from grpclib.encoding.proto import ProtoCodec
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.e2e.grpcio_stack import GrpcioModules
from vmpool.core.instant import MAX_SECONDS, MIN_SECONDS, Instant
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.wire.codec import SafeProtoCodec
from vmpool.wire.fastwire import ExtendCall, LeaseCall, LeaseReply

codec = SafeProtoCodec()
instants = st.builds(
    Instant.of,
    st.integers(MIN_SECONDS, MAX_SECONDS),
    st.integers(0, 999_999_999),
)


@settings(max_examples=300, deadline=None)
@given(instance=st.text(), pool=st.text(), zone=st.text(), expires=instants)
def test_lease_reply_is_what_protobuf_writes(
    grpcio_modules: GrpcioModules, instance: str, pool: str, zone: str, expires: Instant
) -> None:
    pb2 = grpcio_modules.pb2
    fast = codec.encode(LeaseReply(instance, pool, expires, zone), api.LeaseResponse)
    want = pb2.LeaseResponse(
        lease=pb2.Lease(
            instance=instance,
            pool=pool,
            expires=grpcio_modules.timestamp_pb2.Timestamp(
                seconds=expires.seconds, nanos=expires.nanos
            ),
            zone=zone,
        )
    )
    assert fast == want.SerializeToString(deterministic=True)
    for reply in (pb2.LeaseResponse, pb2.ExtendToResponse, pb2.GetLeaseResponse):
        got = reply.FromString(fast).lease.expires
        assert (got.seconds, got.nanos) == (expires.seconds, expires.nanos)


@settings(max_examples=200, deadline=None)
@given(
    expires=st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)
    ).map(lambda d: d.replace(tzinfo=UTC))
)
def test_betterproto_reads_the_reply_as_it_reads_its_own(expires: datetime) -> None:
    """The project's own client (betterproto) reads our replies too."""
    # betterproto leaves out a Timestamp at its default (the epoch); we always
    # send `expires`, so grpc-go sees it present. No lease expires in 1970.
    assume(expires != datetime(1970, 1, 1, tzinfo=UTC))
    fast = codec.encode(
        LeaseReply("vmp-1", "p", Instant.from_datetime(expires), "z"), api.LeaseResponse
    )
    message = api.LeaseResponse(
        lease=api.Lease(instance="vmp-1", pool="p", expires=expires, zone="z")
    )
    assert fast == bytes(message)
    assert api.LeaseResponse().parse(fast).lease.expires == expires


def test_nanoseconds_survive_decoding(grpcio_modules: GrpcioModules) -> None:
    pb2, ts = grpcio_modules.pb2, grpcio_modules.timestamp_pb2
    stamp = ts.Timestamp(seconds=1_790_000_000, nanos=123_456_789)
    lease = codec.decode(
        pb2.LeaseRequest(expires=stamp, reservation_id="").SerializeToString(), api.LeaseRequest
    )
    assert lease == LeaseCall("", Instant.of(1_790_000_000, 123_456_789), "", "")
    extend = codec.decode(
        pb2.ExtendToRequest(instance="vmp-1", to=stamp, extend_only=True).SerializeToString(),
        api.ExtendToRequest,
    )
    assert extend == ExtendCall("vmp-1", Instant.of(1_790_000_000, 123_456_789), "", True)


def test_absent_fields() -> None:
    assert codec.decode(b"", api.LeaseRequest) == LeaseCall("", None, "", None)
    assert codec.decode(b"", api.ExtendToRequest) == ExtendCall("", None, "", False)


def test_return_response_encodes_as_betterproto_would() -> None:
    """The codec answers Return without betterproto (an empty message): right
    only while ReturnResponse has no fields. Every field it has is set here, so
    a field added to the .proto makes the two encodings differ."""
    values = {str: "x", int: 7, bool: True}
    hints = typing.get_type_hints(api.ReturnResponse)
    filled = api.ReturnResponse(
        **{f.name: values[hints[f.name]] for f in dataclasses.fields(api.ReturnResponse)}
    )
    expected = ProtoCodec().encode(filled, api.ReturnResponse)
    assert codec.encode(filled, api.ReturnResponse) == expected


def test_instant_text() -> None:
    assert Instant.of(0, 5).isoformat() == "1970-01-01T00:00:00.000000005Z"
    assert Instant.of(MIN_SECONDS).isoformat() == "0001-01-01T00:00:00Z"
    assert Instant.of(1, 1).ceil() == datetime(1970, 1, 1, 0, 0, 1, 1, tzinfo=UTC)
    assert Instant.of(1, 1).floor() == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_admin_listings_keep_the_nanoseconds() -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    from vmpool.proto.vmpool.admin import v1 as adm
    from vmpool.wire.fastwire import fields, timestamp_field

    expires = Instant.of(1_790_000_000, 123_456_789)
    data = bytes(
        adm.ListLeasesResponse(
            leases=[adm.LeaseInfo(instance="vmp-1", expires=timestamp_field(expires))]
        )
    )
    [(_, _, start, end)] = fields(data)
    info = data[start:end]
    [(_, _, ts_start, ts_end)] = [f for f in fields(info) if f[0] == 6]
    stamp = Timestamp.FromString(info[ts_start:ts_end])
    assert (stamp.seconds, stamp.nanos) == (1_790_000_000, 123_456_789)
