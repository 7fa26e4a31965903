"""Differential fuzz: vmpool.wire.fastwire's request decoders against protobuf's own
parser (upb, the `protobuf` package, with messages compiled from api/ at test
time). On arbitrary and mutated bytes (non-canonical varints, repeated and
unknown fields, groups, fields out of order, unknowns nested inside a
Timestamp, wrong wire types, truncation) both must reject, or both accept with
the same value in every field."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.grpcio_stack import GrpcioModules
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.wire import fastwire

# request type -> (protobuf message name, {field: kind}) as the .proto declares them
REQUESTS: dict[type, tuple[str, dict[str, str]]] = {
    api.LeaseRequest: (
        "LeaseRequest",
        {"pool": "s", "expires": "t", "service_tag": "s", "reservation_id": "o"},
    ),
    api.ReturnRequest: ("ReturnRequest", {"instance": "s", "service_tag": "s"}),
    api.ExtendToRequest: (
        "ExtendToRequest",
        {"instance": "s", "to": "t", "service_tag": "s", "extend_only": "b"},
    ),
    api.GetLeaseRequest: ("GetLeaseRequest", {"instance": "s"}),
}
SETTINGS = settings(
    max_examples=int(os.environ.get("VMPOOL_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def varint(value: int, pad: int = 0) -> bytes:
    """A varint, with ``pad`` redundant continuation bytes (non-canonical, still valid
    up to ten bytes in all)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            break
        out.append(byte | 0x80)
    if pad:  # the last group carried on into zero groups: 0x80 ... 0x00
        out.append(byte | 0x80)
        out.extend([0x80] * (pad - 1))
        out.append(0x00)
    else:
        out.append(byte)
    return bytes(out)


def key(number: int, wire_type: int, pad: int = 0) -> bytes:
    return varint(number << 3 | wire_type, pad)


pads = st.integers(0, 5)
numbers = st.one_of(st.integers(1, 6), st.integers(1, 2**29 - 1), st.sampled_from([0, 2**29]))
wire_types = st.integers(0, 7)
int64s = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-62135596801, 253402300800),
    st.sampled_from([0, 1, -1, -62135596800, 253402300799, 2**64 - 1, 2**70]),
)


@st.composite
def timestamp_body(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A Timestamp's bytes: seconds/nanos in any order, repeated, padded varints,
    unknown fields (the `1a 02 08 05` case: an unknown field 3 holding bytes that
    look like a seconds field), and wrong wire types for 1 and 2."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        choice = draw(st.integers(0, 5))
        if choice == 0:
            parts.append(key(1, 0, draw(pads)) + varint(draw(int64s), draw(pads)))
        elif choice == 1:
            nanos = draw(st.one_of(st.integers(-(2**31), 2**32), st.integers(0, 999_999_999)))
            parts.append(key(2, 0, draw(pads)) + varint(nanos, draw(pads)))
        elif choice == 2:
            inner = key(1, 0) + varint(draw(int64s))
            parts.append(key(draw(st.integers(3, 20)), 2) + varint(len(inner)) + inner)
        elif choice == 3:
            parts.append(draw(field(depth + 1)))
        elif choice == 4:
            wrong = draw(st.sampled_from([1, 2, 5]))
            parts.append(key(draw(st.sampled_from([1, 2])), wrong) + draw(payload(wrong)))
        else:
            parts.append(draw(st.binary(max_size=6)))
    return b"".join(parts)


def payload(wire_type: int) -> st.SearchStrategy[bytes]:
    if wire_type == 0:
        return st.builds(varint, int64s, pads)
    if wire_type == 1:
        return st.binary(min_size=8, max_size=8)
    if wire_type == 5:
        return st.binary(min_size=4, max_size=4)
    return st.binary(max_size=12).map(lambda b: varint(len(b)) + b)


@st.composite
def field(draw: st.DrawFn, depth: int = 0) -> bytes:
    """One field of any number and wire type, mostly well formed."""
    number = draw(numbers)
    wire_type = draw(wire_types)
    if wire_type == 2:
        kind = draw(st.integers(0, 3))
        if kind == 0 and depth < 3:
            body = draw(timestamp_body(depth + 1))
        elif kind == 1:
            body = draw(st.text(max_size=8)).encode()
        else:
            body = draw(st.binary(max_size=10))
        return key(number, 2, draw(pads)) + varint(len(body), draw(pads)) + body
    if wire_type == 3:
        inner = b"".join(draw(st.lists(field(depth + 1), max_size=2))) if depth < 3 else b""
        end = number if draw(st.integers(0, 9)) else draw(numbers)
        return key(number, 3) + inner + key(end, 4)
    if wire_type in (4, 6, 7):
        return key(number, wire_type)
    return key(number, wire_type, draw(pads)) + draw(payload(wire_type))


@st.composite
def known_field(draw: st.DrawFn, kinds: dict[str, str]) -> bytes:
    """A field the message declares, of its own type, often non-canonical."""
    names = list(kinds)
    index = draw(st.integers(0, len(names) - 1))
    name = names[index]
    number = {"reservation_id": 4, "extend_only": 4, "service_tag": 3, "expires": 2, "to": 2}.get(
        name, 1
    )
    kind = kinds[name]
    if kind == "b":
        return key(number, 0, draw(pads)) + varint(draw(int64s), draw(pads))
    if kind == "t":
        body = draw(timestamp_body())
    else:
        body = draw(st.one_of(st.text(max_size=10).map(str.encode), st.binary(max_size=6)))
    return key(number, 2, draw(pads)) + varint(len(body), draw(pads)) + body


@st.composite
def messages(draw: st.DrawFn, kinds: dict[str, str]) -> bytes:
    parts = draw(st.lists(st.one_of(known_field(kinds), field()), max_size=6))
    data = b"".join(draw(st.permutations(parts)))
    mutation = draw(st.integers(0, 5))
    if mutation == 1 and data:  # truncated
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == 2 and data:  # one byte changed
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    elif mutation == 3:  # everything twice: last scalar wins, messages merge
        data += data
    return data


def upb_view(message: Any, kinds: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in kinds.items():
        if kind == "t":
            if message.HasField(name):
                ts = getattr(message, name)
                out[name] = (ts.seconds, ts.nanos)
        elif kind == "o":
            if message.HasField(name):
                out[name] = getattr(message, name)
        else:
            value = getattr(message, name)
            if value:
                out[name] = value
    return out


def ours_view(values: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    # proto3 implicit presence: an empty string or false is as good as absent.
    return {k: v for k, v in values.items() if kinds[k] in "to" or v}


def agree(grpcio_modules: GrpcioModules, request: type, data: bytes) -> None:
    name, kinds = REQUESTS[request]
    theirs: dict[str, Any] | None
    try:
        message = getattr(grpcio_modules.pb2, name).FromString(data)
        theirs = upb_view(message, kinds)
    except Exception:  # DecodeError, or upb's RuntimeWarning-free refusal
        theirs = None
    try:
        ours: dict[str, Any] | None = ours_view(
            fastwire.parse(data, fastwire.SCHEMAS[request]), kinds
        )
    except fastwire.WireError:
        ours = None
    assert ours == theirs, f"{name} {data.hex(' ')}: ours {ours}, protobuf {theirs}"


@pytest.mark.parametrize("request_type", list(REQUESTS), ids=lambda t: t.__name__)
@SETTINGS
@given(data=st.data())
def test_mutated_messages_decode_as_protobuf_decodes_them(
    grpcio_modules: GrpcioModules, request_type: type, data: st.DataObject
) -> None:
    agree(grpcio_modules, request_type, data.draw(messages(REQUESTS[request_type][1])))


@pytest.mark.parametrize("request_type", list(REQUESTS), ids=lambda t: t.__name__)
@SETTINGS
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_decode_as_protobuf_decodes_them(
    grpcio_modules: GrpcioModules, request_type: type, data: bytes
) -> None:
    agree(grpcio_modules, request_type, data)


@pytest.mark.parametrize(
    "hexbytes",
    [
        "12 04 08 05 1a 00",  # unknown field inside the Timestamp
        "12 06 08 05 1a 02 08 07",  # the same, holding bytes that look like seconds
        "12 02 08 05 12 02 10 07",  # the Timestamp twice: merged
        "12 03 0a 01 05",  # seconds of the wrong wire type: unknown
        "12 0b 08 ff ff ff ff ff ff ff ff ff 7f",  # ten-byte varint, high bits dropped
        "12 0c 08 80 80 80 80 80 80 80 80 80 80 00",  # eleven bytes: refused
        "1b 08 05 1c",  # an unknown group
        "0b 0c",  # a group where a string is declared: unknown
        "1b 24",  # a group ended by another number: refused
        "1b 00 00 1c",  # field number 0 inside a group: skipped
        "00 00",  # field number 0: refused
        "0a 80 80 80 80 80 00",  # a length prefix of six bytes: refused
        "0a 02 c3 28",  # not UTF-8: refused
        "0a 05 80 80 80 80 00",  # a string of a five-byte length
        "f8 ff ff ff 0f 05",  # the largest field number
        "80 80 80 80 10 05",  # past the largest field number: refused
    ],
)
def test_known_corners(grpcio_modules: GrpcioModules, hexbytes: str) -> None:
    data = bytes.fromhex(hexbytes.replace(" ", ""))
    for request in REQUESTS:
        agree(grpcio_modules, request, data)
