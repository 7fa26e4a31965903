"""Hand-written wire code for the lease hot path.

betterproto 2.0.0b7 spends ~200 µs encoding one LeaseResponse (its
``__getattribute__`` runs ~140 times per message) and ~75 µs decoding one
LeaseRequest, and it reads a Timestamp into a ``datetime``, which has no
nanoseconds. These take ~10 µs and keep the nanoseconds (``Instant``).

The decoders follow the protobuf wire format as upb (the ``protobuf``
package's parser) reads it, which tests/fuzz/test_wire_differential.py checks
on arbitrary and mutated bytes: varints of up to ten bytes cut to 64 bits,
keys of up to five bytes below 2**32, field number 0 refused (but inside
groups), length prefixes of up to five bytes below 2**31, groups skipped,
a field of a wire type other than its declared one kept as unknown (that is,
ignored), the last value of a repeated scalar wins, repeated occurrences of a
message field merge, strings must be UTF-8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from betterproto.lib.google.protobuf import Timestamp

from vmpool.core.instant import MAX_SECONDS, MIN_SECONDS, Instant
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api

_VARINT, _FIXED64, _LEN, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_MAX_DEPTH = 100  # nested groups, as upb allows
_MASK64 = (1 << 64) - 1


class WireError(ValueError):
    """The bytes are not a protobuf message."""


# --- reading ---------------------------------------------------------------------------


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``: at most ten bytes, the value
    cut to 64 bits; WireError if truncated or longer."""
    value = shift = 0
    end = min(len(data), pos + 10)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & _MASK64, pos
        shift += 7
    raise WireError("truncated or overlong varint")


def _read_key(data: bytes, pos: int, *, in_group: bool = False) -> tuple[int, int, int]:
    """(field number, wire type, next position). upb refuses field number 0,
    except inside a group it skips."""
    start = pos
    key, pos = read_varint(data, pos)
    if pos - start > 5 or key >> 32:
        raise WireError("field key longer than 32 bits")
    number, wire_type = key >> 3, key & 7
    if number == 0 and not in_group:
        raise WireError("field number 0")
    if wire_type > _FIXED32:
        raise WireError(f"invalid wire type {wire_type}")
    return number, wire_type, pos


def _read_length(data: bytes, pos: int) -> tuple[int, int]:
    """A length prefix: at most five bytes, below 2**31 (as upb)."""
    start = pos
    length, pos = read_varint(data, pos)
    if pos - start > 5 or length >> 31:
        raise WireError("length prefix too long")
    return length, pos


def _skip(data: bytes, pos: int, number: int, wire_type: int, depth: int) -> int:
    """The position after the value of a field; WireError if it runs past the end."""
    if wire_type == _VARINT:
        return read_varint(data, pos)[1]
    if wire_type == _FIXED64:
        pos += 8
    elif wire_type == _FIXED32:
        pos += 4
    elif wire_type == _LEN:
        length, pos = _read_length(data, pos)
        pos += length
    elif wire_type == _START_GROUP:
        if depth >= _MAX_DEPTH:
            raise WireError("groups nested too deep")
        while True:
            inner, inner_type, pos = _read_key(data, pos, in_group=True)
            if inner_type == _END_GROUP:
                if inner != number:
                    raise WireError("end of a group that was not started")
                return pos
            pos = _skip(data, pos, inner, inner_type, depth + 1)
    else:
        raise WireError("end of a group that was not started")
    if pos > len(data):
        raise WireError("field runs past the end of the message")
    return pos


def fields(data: bytes, limit: int | None = None) -> list[tuple[int, int, int, int]]:
    """(number, wire type, start, end) of each top-level field; for a
    length-delimited field start..end is its payload. WireError if the bytes are
    not a well-formed message. ``limit``: stop after that many fields and one
    more (the caller refuses the message)."""
    out: list[tuple[int, int, int, int]] = []
    pos = 0
    while pos < len(data) and (limit is None or len(out) <= limit):
        number, wire_type, pos = _read_key(data, pos)
        start = pos
        pos = _skip(data, pos, number, wire_type, 0)
        if wire_type == _LEN:
            start = _read_length(data, start)[1]
        out.append((number, wire_type, start, pos))
    return out


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def merge_timestamp(raw: bytes, seconds: int = 0, nanos: int = 0) -> tuple[int, int]:
    """A Timestamp's (seconds, nanos) after merging ``raw`` into the given ones."""
    for number, wire_type, start, _ in fields(raw):
        if wire_type == _VARINT and number in (1, 2):
            value = read_varint(raw, start)[0]
            if number == 1:
                seconds = _signed(value, 64)
            else:
                nanos = _signed(value, 32)
    return seconds, nanos


_STRING, _OPTIONAL_STRING, _BOOL, _TIMESTAMP = "string", "optional string", "bool", "timestamp"
_WIRE = {_STRING: _LEN, _OPTIONAL_STRING: _LEN, _BOOL: _VARINT, _TIMESTAMP: _LEN}

# Field number -> (name, kind), per request.
SCHEMAS: dict[type, dict[int, tuple[str, str]]] = {
    api.LeaseRequest: {
        1: ("pool", _STRING),
        2: ("expires", _TIMESTAMP),
        3: ("service_tag", _STRING),
        4: ("reservation_id", _OPTIONAL_STRING),
    },
    api.ReturnRequest: {1: ("instance", _STRING), 3: ("service_tag", _STRING)},
    api.ExtendToRequest: {
        1: ("instance", _STRING),
        2: ("to", _TIMESTAMP),
        3: ("service_tag", _STRING),
        4: ("extend_only", _BOOL),
    },
    api.GetLeaseRequest: {1: ("instance", _STRING)},
}


def parse(data: bytes, schema: dict[int, tuple[str, str]]) -> dict[str, Any]:
    """The fields present in ``data``, by name: strings as str, bools as bool,
    Timestamps as (seconds, nanos) unchecked. WireError if malformed."""
    values: dict[str, Any] = {}
    for number, wire_type, start, end in fields(data):
        known = schema.get(number)
        if known is None or _WIRE[known[1]] != wire_type:
            continue  # unknown, or of another wire type: an unknown field
        name, kind = known
        if kind == _BOOL:
            values[name] = read_varint(data, start)[0] != 0
        elif kind == _TIMESTAMP:
            values[name] = merge_timestamp(data[start:end], *values.get(name, (0, 0)))
        else:
            try:
                values[name] = data[start:end].decode()
            except UnicodeDecodeError:
                raise WireError(f"{name}: not UTF-8") from None
    return values


# --- the decoded requests --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseCall:
    pool: str
    expires: Instant | None
    service_tag: str
    reservation_id: str | None


@dataclass(frozen=True, slots=True)
class ReturnCall:
    instance: str
    service_tag: str


@dataclass(frozen=True, slots=True)
class ExtendCall:
    instance: str
    to: Instant | None
    service_tag: str
    extend_only: bool


@dataclass(frozen=True, slots=True)
class GetLeaseCall:
    instance: str


class BadField(ValueError):
    """Well-formed bytes carrying a value the contract refuses; names the field."""


def instant(name: str, value: tuple[int, int] | None) -> Instant | None:
    """A decoded Timestamp, checked: 0001-01-01..9999-12-31, nanos in [0, 1e9)."""
    if value is None:
        return None
    seconds, nanos = value
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise BadField(f"{name}: seconds {seconds} outside 0001-01-01..9999-12-31")
    if not 0 <= nanos <= 999_999_999:
        raise BadField(f"{name}: nanos {nanos} outside [0, 999999999]")
    return Instant.of(seconds, nanos)


def _lease(v: dict[str, Any]) -> LeaseCall:
    return LeaseCall(
        v.get("pool", ""),
        instant("expires", v.get("expires")),
        v.get("service_tag", ""),
        v.get("reservation_id"),
    )


def _return(v: dict[str, Any]) -> ReturnCall:
    return ReturnCall(v.get("instance", ""), v.get("service_tag", ""))


def _extend(v: dict[str, Any]) -> ExtendCall:
    return ExtendCall(
        v.get("instance", ""),
        instant("to", v.get("to")),
        v.get("service_tag", ""),
        v.get("extend_only", False),
    )


def _get(v: dict[str, Any]) -> GetLeaseCall:
    return GetLeaseCall(v.get("instance", ""))


_BUILD: dict[type, Callable[[dict[str, Any]], Any]] = {
    api.LeaseRequest: _lease,
    api.ReturnRequest: _return,
    api.ExtendToRequest: _extend,
    api.GetLeaseRequest: _get,
}


def decoder(message_type: type) -> Callable[[bytes], Any] | None:
    """The fast decoder of a request type (WireError / BadField on bad bytes), or None."""
    schema, build = SCHEMAS.get(message_type), _BUILD.get(message_type)
    if schema is None or build is None:
        return None
    return lambda data: build(parse(data, schema))


# --- replies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """LeaseResponse, ExtendToResponse and GetLeaseResponse: one ``Lease`` field 1."""

    instance: str
    pool: str
    expires: Instant
    zone: str


def _varint(value: int) -> bytes:
    value &= _MASK64  # negative int64: ten bytes of two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(number: int, value: str) -> bytes:
    if not value:
        return b""  # proto3: a default value is not sent
    data = value.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _message(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def timestamp(value: Instant) -> bytes:
    """A google.protobuf.Timestamp's bytes."""
    out = b""
    if value.seconds:
        out += b"\x08" + _varint(value.seconds)
    if value.nanos:
        out += b"\x10" + _varint(value.nanos)
    return out


def encode_lease_reply(reply: LeaseReply) -> bytes:
    body = (
        _string(1, reply.instance)
        + _string(2, reply.pool)
        + _message(3, timestamp(reply.expires))
        + _string(4, reply.zone)
    )
    return _message(1, body)


def timestamp_field(value: Instant) -> datetime:
    """A betterproto message's Timestamp field value that keeps the nanoseconds
    (admin replies). betterproto types Timestamp fields as datetime
    (microseconds), but encodes any message it finds in a message field as it
    is, and a Timestamp message keeps them."""
    return cast(datetime, Timestamp(seconds=value.seconds, nanos=value.nanos))


@dataclass(frozen=True, slots=True)
class LeaseEventFields:
    """vmpool.admin.v1.LeaseEvent: what WatchLeases sends for each event."""

    cursor: str
    time: Instant
    type: int
    instance: str
    pool: str
    service_tag: str
    owner_principal: str
    expires: Instant | None
    reservation_id: str
    principal: str
    reason: str


def encode_lease_event(e: LeaseEventFields) -> bytes:
    """Encoded once per event and sent to every stream that sees it: betterproto
    took ~35x as long per event (`python -m tests.bench.micro`), a large share
    of the server's CPU under load."""
    return b"".join(
        (
            _string(1, e.cursor),
            _message(2, timestamp(e.time)),
            b"\x18" + _varint(e.type) if e.type else b"",
            _string(4, e.instance),
            _string(5, e.pool),
            _string(6, e.service_tag),
            _string(7, e.owner_principal),
            _message(8, timestamp(e.expires)) if e.expires is not None else b"",
            _string(9, e.reservation_id),
            _string(10, e.principal),
            _string(11, e.reason),
        )
    )
