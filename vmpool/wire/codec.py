"""A protobuf codec that answers undecodable requests with INVALID_ARGUMENT.

grpclib turns any exception raised while decoding into UNKNOWN "Internal
Server Error"; betterproto raises OverflowError for Timestamps outside
datetime's range, and silently accepts some malformed bytes (a length running
past the end, a field of the wrong wire type). Here the bytes are checked in
one pass first, and every failure becomes GRPCError(INVALID_ARGUMENT) naming
the field; the server keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import betterproto
from betterproto.lib.google.protobuf import Empty, FieldMask
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.wire.fastwire import (
    BadField,
    LeaseReply,
    WireError,
    decoder,
    encode_lease_reply,
    fields,
    instant,
    merge_timestamp,
)

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_BETTERPROTO_WIRE = frozenset({_VARINT, _FIXED64, _LEN, _FIXED32})
# An update_mask names Spec fields (a handful): more paths than this are refused
# before betterproto decodes them (a million paths took seconds of CPU).
MAX_MASK_PATHS = 64


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    wire_types: frozenset[int]
    timestamp: bool
    mask: bool = False


_layouts: dict[type, dict[int, _Field]] = {}
_decoders: dict[type, Any] = {}
_UNSET = object()


def _layout(cls: type) -> dict[int, _Field]:
    """Field number -> what a betterproto message expects there."""
    found = _layouts.get(cls)
    if found is None:
        found = {}
        meta = getattr(cls, "_betterproto", None)
        if meta is not None:
            for name, field_meta in meta.meta_by_field_name.items():
                kind = field_meta.proto_type
                if kind in betterproto.WIRE_VARINT_TYPES:
                    wire = {_VARINT}
                elif kind in betterproto.WIRE_FIXED_32_TYPES:
                    wire = {_FIXED32}
                elif kind in betterproto.WIRE_FIXED_64_TYPES:
                    wire = {_FIXED64}
                else:
                    wire = {_LEN}
                if meta.default_gen.get(name) is list:
                    wire.add(_LEN)  # packed repeated scalars
                is_ts = meta.cls_by_field.get(name) is datetime
                is_mask = meta.cls_by_field.get(name) is FieldMask
                found[field_meta.number] = _Field(name, frozenset(wire), is_ts, is_mask)
        _layouts[cls] = found
    return found


def _check_timestamp(name: str, raw: bytes) -> None:
    try:
        instant(name, merge_timestamp(raw))
    except WireError as err:
        raise BadField(f"{name}: malformed Timestamp: {err}") from None


def _check_mask(name: str, raw: bytes, before: int) -> int:
    """Paths in this FieldMask plus ``before`` (from earlier copies of the field,
    which protobuf merges); BadField past MAX_MASK_PATHS."""
    try:
        paths = before + len(fields(raw, MAX_MASK_PATHS - before))
    except WireError as err:
        raise BadField(f"{name}: malformed FieldMask: {err}") from None
    if paths > MAX_MASK_PATHS:
        raise BadField(f"{name}: more than {MAX_MASK_PATHS} paths")
    return paths


def check(data: bytes, cls: type) -> list[tuple[int, int, int, int]]:
    """Well-formed bytes, each known field of its declared wire type, and
    Timestamps within 0001-01-01..9999-12-31 with nanos in [0, 1e9). Returns
    the fields as ``fastwire.fields`` found them. WireError / BadField if not."""
    layout = _layout(cls)
    found = fields(data)
    paths = 0
    for number, wire_type, start, end in found:
        if wire_type not in _BETTERPROTO_WIRE:
            raise WireError(f"unsupported wire type {wire_type}")  # betterproto has no groups
        field = layout.get(number)
        if field is None:
            continue  # unknown fields are allowed (newer clients)
        if wire_type not in field.wire_types:
            raise BadField(f"{field.name}: wire type {wire_type} does not match the field's type")
        if field.timestamp:
            _check_timestamp(field.name, data[start:end])
        elif field.mask:
            paths = _check_mask(field.name, data[start:end], paths)
    return found


class Encoded(bytes):
    """A reply message already encoded (a lease event shared by many streams):
    sent as it is."""


# Ping's reply never changes: built and encoded once (handlers return PONG).
PONG = api.PingResponse(msg="pong")
_PONG_WIRE = bytes(PONG)
_EMPTY = Empty()  # an empty request (Ping's): nothing to decode or check


class SafeProtoCodec(ProtoCodec):
    """The lease requests and replies go through vmpool.wire.fastwire (nanosecond
    Timestamps, and fast); every other message through betterproto, checked first."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if message is PONG:
            return _PONG_WIRE
        if isinstance(message, LeaseReply):
            return encode_lease_reply(message)
        if type(message) is Encoded:
            return message
        if message_type is api.ReturnResponse:
            return b""  # no fields
        return super().encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        if not data and message_type is Empty:
            return _EMPTY
        name = getattr(message_type, "__name__", "request")
        fast = _decoders.get(message_type, _UNSET)
        if fast is _UNSET:
            fast = _decoders[message_type] = decoder(message_type)
        try:
            if fast is not None:
                return fast(data)
            check(data, message_type)
            return message_type.FromString(data)
        except BadField as err:
            raise GRPCError(Status.INVALID_ARGUMENT, str(err)) from None
        except WireError as err:
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"request: cannot decode {name}: {err}"
            ) from None
        except Exception as err:  # any decoding failure is the client's bytes
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"request: cannot decode {name}: {type(err).__name__}"
            ) from err
