"""A protobuf codec that answers undecodable requests with INVALID_ARGUMENT.

grpclib turns any exception raised while decoding into UNKNOWN "Internal
Server Error"; betterproto raises OverflowError for Timestamps outside
datetime's range and assorted errors for bad bytes. Here they become
GRPCError(INVALID_ARGUMENT) naming the field, and the server keeps serving.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import betterproto
from betterproto.lib.google.protobuf import Timestamp
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

MIN_SECONDS = -62135596800  # 0001-01-01T00:00:00Z
MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z
_WIRE_LEN_DELIM = 2

_ts_fields: dict[type, dict[int, str]] = {}


def _timestamp_fields(cls: type) -> dict[int, str]:
    """Field number -> name of the Timestamp fields of a betterproto message."""
    found = _ts_fields.get(cls)
    if found is None:
        found = {}
        meta = getattr(cls, "_betterproto", None)
        if meta is not None:
            for name, field_meta in meta.meta_by_field_name.items():
                if meta.cls_by_field.get(name) is datetime:
                    found[field_meta.number] = name
        _ts_fields[cls] = found
    return found


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def check_wire(data: bytes) -> None:
    """Reject bytes that are not a well-formed protobuf message. betterproto
    silently accepts some (e.g. a length running past the end)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire_type, number = key & 7, key >> 3
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == _WIRE_LEN_DELIM:
            length, pos = _varint(data, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise ValueError("field runs past the end of the message")


_wire_types: dict[type, dict[int, tuple[str, frozenset[int]]]] = {}


def _expected_wire_types(cls: type) -> dict[int, tuple[str, frozenset[int]]]:
    """Field number -> (name, wire types allowed) of a betterproto message."""
    found = _wire_types.get(cls)
    if found is None:
        found = {}
        meta = getattr(cls, "_betterproto", None)
        if meta is not None:
            for name, field_meta in meta.meta_by_field_name.items():
                kind = field_meta.proto_type
                if kind in betterproto.WIRE_VARINT_TYPES:
                    wire = {0}
                elif kind in betterproto.WIRE_FIXED_32_TYPES:
                    wire = {5}
                elif kind in betterproto.WIRE_FIXED_64_TYPES:
                    wire = {1}
                else:
                    wire = {_WIRE_LEN_DELIM}
                if meta.default_gen.get(name) is list:
                    wire.add(_WIRE_LEN_DELIM)  # packed repeated scalars
                found[field_meta.number] = (name, frozenset(wire))
        _wire_types[cls] = found
    return found


def check_wire_types(data: bytes, cls: type) -> None:
    """betterproto takes a field of the wrong wire type as is (an int for a
    string field, a list for a bool): refuse it, naming the field."""
    expected = _expected_wire_types(cls)
    for parsed in betterproto.parse_fields(data):
        field = expected.get(parsed.number)
        if field is not None and parsed.wire_type not in field[1]:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"{field[0]}: wire type {parsed.wire_type} does not match the field's type",
            )


def check_timestamps(data: bytes, cls: type) -> None:
    fields = _timestamp_fields(cls)
    if not fields:
        return
    for parsed in betterproto.parse_fields(data):
        name = fields.get(parsed.number)
        if name is None:
            continue
        if parsed.wire_type != _WIRE_LEN_DELIM:
            raise GRPCError(Status.INVALID_ARGUMENT, f"{name}: not a Timestamp")
        try:
            check_wire(parsed.value)
        except ValueError as err:
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"{name}: malformed Timestamp: {err}"
            ) from None
        ts = Timestamp().parse(parsed.value)
        if not MIN_SECONDS <= ts.seconds <= MAX_SECONDS:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"{name}: seconds {ts.seconds} outside 0001-01-01..9999-12-31",
            )
        if not 0 <= ts.nanos <= 999_999_999:
            raise GRPCError(Status.INVALID_ARGUMENT, f"{name}: nanos {ts.nanos} outside [0, 1e9)")


class SafeProtoCodec(ProtoCodec):
    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            check_wire(data)
            check_wire_types(data, message_type)
            check_timestamps(data, message_type)
            return message_type.FromString(data)
        except GRPCError:
            raise
        except Exception as err:  # any decoding failure is the client's bytes
            name = getattr(message_type, "__name__", "request")
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"request: cannot decode {name}: {type(err).__name__}"
            ) from err
