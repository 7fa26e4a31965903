from __future__ import annotations

import pytest
from betterproto.lib.google.protobuf import Timestamp
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmpool.core.instant import GO_ZERO_TIME
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.wire.codec import SafeProtoCodec

codec = SafeProtoCodec()


def _lease_request_with(ts: Timestamp) -> bytes:
    # field 2 (expires), wire type 2: tag 0x12, then length-prefixed Timestamp bytes
    body = bytes(ts)
    return bytes([0x12, len(body)]) + body + bytes(api.LeaseRequest(service_tag="t"))


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(253402300800, 0), (-62135596801, 0), (2**62, 0), (0, -1), (0, 1_000_000_000)],
)
def test_out_of_range_timestamps_are_invalid_argument(seconds: int, nanos: int) -> None:
    data = _lease_request_with(Timestamp(seconds=seconds, nanos=nanos))
    with pytest.raises(GRPCError) as err:
        codec.decode(data, api.LeaseRequest)
    assert err.value.status is Status.INVALID_ARGUMENT
    assert "expires" in (err.value.message or "")


def test_go_zero_time_decodes() -> None:
    msg = codec.decode(_lease_request_with(Timestamp(seconds=-62135596800)), api.LeaseRequest)
    assert msg.expires == GO_ZERO_TIME
    assert msg.service_tag == "t"


@pytest.mark.parametrize(
    "data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x12\x03\x08\xff"]
)
def test_garbage_is_invalid_argument(data: bytes) -> None:
    with pytest.raises(GRPCError) as err:
        codec.decode(data, api.LeaseRequest)
    assert err.value.status is Status.INVALID_ARGUMENT


def test_valid_message_round_trips() -> None:
    req = api.ExtendToRequest(instance="vmp-1", service_tag="t", extend_only=True)
    out = codec.decode(codec.encode(req, api.ExtendToRequest), api.ExtendToRequest)
    assert out.instance == "vmp-1" and out.extend_only


def test_an_update_mask_of_a_million_paths_is_refused_before_it_is_decoded() -> None:
    """A million paths took betterproto seconds of CPU (the whole server's loop);
    a mask names a handful of Spec fields, so past 64 paths is INVALID_ARGUMENT,
    also when the paths are spread over repeated copies of the mask field
    (each copy is decoded too)."""
    from betterproto.lib.google.protobuf import FieldMask

    from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi
    from vmpool.wire.codec import MAX_MASK_PATHS

    one = bytes(papi.UpdatePoolRequest(name="p", update_mask=FieldMask(paths=["runtime"])))
    huge = papi.UpdatePoolRequest(name="p", update_mask=FieldMask(paths=["runtime"] * 1_000_000))
    spread = one * (MAX_MASK_PATHS + 1)  # protobuf merges the copies: 65 paths
    for data in (bytes(huge), spread):
        with pytest.raises(GRPCError) as err:
            codec.decode(data, papi.UpdatePoolRequest)
        assert err.value.status is Status.INVALID_ARGUMENT
        assert err.value.message == f"update_mask: more than {MAX_MASK_PATHS} paths"
    at_limit = papi.UpdatePoolRequest(
        name="p", update_mask=FieldMask(paths=["runtime"] * MAX_MASK_PATHS)
    )
    decoded = codec.decode(bytes(at_limit), papi.UpdatePoolRequest)
    assert decoded.update_mask.paths == ["runtime"] * MAX_MASK_PATHS
