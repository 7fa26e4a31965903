"""One gRPC call on an HTTP/2 stream: its request headers and message framing.

This replaces grpclib's ``server.request_handler`` and message reader, which
answer many client mistakes with UNKNOWN, INTERNAL or a dropped connection
(an unknown method without content-type, a gzip request, a truncated message,
a ``grpc-timeout`` of ``1n``). Here every such mistake gets a status on its own
stream (lease-api.md section 4a, identity.md section 6):

- an unknown service or method: UNIMPLEMENTED, content-type application/grpc;
- ``grpc-encoding`` other than identity or gzip: UNIMPLEMENTED naming both;
- missing pseudo-headers, a wrong content-type, a malformed ``grpc-timeout``,
  a metadata value that is not printable ASCII or not base64 (``-bin``):
  INVALID_ARGUMENT naming the header;
- a message longer than max_message_bytes (from its length prefix, before it
  is buffered; or once gunzipped): RESOURCE_EXHAUSTED;
- a truncated message, the compressed flag without ``grpc-encoding``, no
  message at all, bytes that are not gzip: INVALID_ARGUMENT;
- a first message not complete within handshake_timeout: the connection is
  closed (``on_stall``: GOAWAY ENHANCE_YOUR_CALM), as a stalled client holds a
  stream for nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import h2.exceptions
import structlog
from grpclib import protocol
from grpclib.const import Handler, Status
from grpclib.encoding.base import GRPC_CONTENT_TYPE, CodecBase, StatusDetailsCodecBase
from grpclib.events import _DispatchServerEvents
from grpclib.exceptions import GRPCError
from grpclib.metadata import Deadline, encode_grpc_message
from grpclib.server import Stream
from grpclib.utils import DeadlineWrapper, Wrapper
from multidict import MultiDict

from vmpool.core.echo import MAX_STATUS_MESSAGE, echo, status_message

log = structlog.get_logger("vmpool.grpc")

ENCODINGS = ("identity", "gzip")
ACCEPT_ENCODING = ("grpc-accept-encoding", ",".join(ENCODINGS))
_TIMEOUT = re.compile(r"[0-9]{1,8}[HMSmun]")  # the gRPC spec: at most 8 digits and a unit
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_SKIPPED = frozenset({"te", "content-type", "user-agent"})
_Headers = list[tuple[str, str]]


class Stalled(Exception):
    """The client did not send its request in time."""


STALLED = "stalled_request: request not complete within limits.handshake_timeout"
TRUNCATED = "request: the stream ended inside a message (truncated)"


class GuardedH2Stream(protocol.Stream):
    """grpclib's HTTP/2 stream, knowing whether the client ended it, advertising
    the encodings accepted, and never sending a long grpc-message.

    ``corked`` (a unary reply): the headers and the message are queued in h2 and
    go out with the trailers in one socket write, not three (grpclib writes
    each frame as it makes it)."""

    ended = False
    corked = False
    handled = False  # the call's handler returned: its answer is on the way out

    def __ended__(self) -> None:
        self.ended = True
        super().__ended__()

    async def send_headers(self, headers: _Headers, end_stream: bool = False) -> None:
        if headers and headers[0][0] == ":status":
            headers = [*headers, ACCEPT_ENCODING]
        for i, (key, value) in enumerate(headers):
            if key == "grpc-message" and len(value) > MAX_STATUS_MESSAGE:
                headers = list(headers)
                headers[i] = (key, _cut_encoded(value))
        if not self.corked or end_stream:
            await super().send_headers(headers, end_stream)
            return
        # grpclib's send_headers without its write.
        assert self.id is not None
        await self.connection.write_ready.wait()
        if self.id not in self._h2_connection.streams:
            raise h2.exceptions.StreamClosedError(self.id)
        self._h2_connection.send_headers(self.id, headers, end_stream=False)
        self.connection.headers_send_process()

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        h2c = self._h2_connection
        if self.corked and not end_stream and self.id is not None:
            await self.connection.write_ready.wait()
            size = len(data)
            window = h2c.local_flow_control_window(self.id)
            if 0 < size <= min(window, h2c.max_outbound_frame_size):
                h2c.send_data(self.id, data)
                self.data_sent += size
                self.connection.data_sent += size
                self.connection.data_send_process()
                return
        # Not corked, or a message the window or frame size splits: grpclib's
        # loop (its first write takes what was queued too).
        await super().send_data(data, end_stream)


def _cut_encoded(value: str) -> str:
    """A percent-encoded grpc-message cut to MAX_STATUS_MESSAGE, not inside an escape."""
    cut = value[: MAX_STATUS_MESSAGE - 16]
    tail = cut.rfind("%", len(cut) - 2)
    if tail != -1:
        cut = cut[:tail]
    return f"{cut}...({len(value)} bytes)"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call answered from its headers alone."""

    http_status: int
    status: Status
    message: str


@dataclass(frozen=True, slots=True)
class CallHeaders:
    path: str
    handler: Handler
    content_type: str
    timeout: float | None
    gzip: bool
    metadata: MultiDict[str | bytes]
    user_agent: str | None


def _printable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def parse_timeout(value: str) -> float:
    """A grpc-timeout value in seconds; ValueError if it is not 1-8 digits and a unit."""
    if not _TIMEOUT.fullmatch(value):
        raise ValueError(value)
    return int(value[:-1]) * _UNITS[value[-1]]


def check_headers(
    headers: _Headers, mapping: dict[str, Handler], subtype: str
) -> CallHeaders | Refusal:
    """What the request headers ask for, or why the call is refused."""
    pseudo: dict[str, str] = {}
    content_type = user_agent = encoding = None
    timeout: float | None = None
    metadata: MultiDict[str | bytes] = MultiDict()
    for key, value in headers:
        if key.startswith(":"):
            pseudo[key] = value
            continue
        if not (_printable(key) and (value == "" or _printable(value))):
            return Refusal(
                400, Status.INVALID_ARGUMENT, f"metadata {echo(key)!r}: not printable ASCII"
            )
        if key == "content-type":
            content_type = value
        elif key == "user-agent":
            user_agent = value
        elif key == "grpc-encoding":
            encoding = value
        elif key == "grpc-timeout":
            try:
                seconds = parse_timeout(value)
            except ValueError:
                return Refusal(
                    200,
                    Status.INVALID_ARGUMENT,
                    f"grpc-timeout: {echo(value)!r} is not 1-8 digits and a unit (H, M, S, m, u, n)",
                )
            timeout = seconds if timeout is None else min(timeout, seconds)
        elif key.startswith("grpc-") or key in _SKIPPED:
            continue
        elif key.endswith("-bin"):
            try:
                metadata.add(key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True))
            except (binascii.Error, ValueError):
                return Refusal(200, Status.INVALID_ARGUMENT, f"metadata {echo(key)!r}: not base64")
        else:
            metadata.add(key, value)
    for name in (":method", ":path"):
        if name not in pseudo:
            return Refusal(400, Status.INVALID_ARGUMENT, f"{name}: missing pseudo-header")
    if pseudo[":method"] != "POST":
        return Refusal(
            405, Status.INVALID_ARGUMENT, f":method: {echo(pseudo[':method'])!r}, gRPC needs POST"
        )
    base, _, sub = (content_type or "").partition("+")
    if base != GRPC_CONTENT_TYPE or (sub or "proto") != subtype:
        shown = "missing" if content_type is None else repr(echo(content_type))
        return Refusal(
            415, Status.INVALID_ARGUMENT, f"content-type: {shown}, expected {GRPC_CONTENT_TYPE}"
        )
    path = pseudo[":path"]
    handler = mapping.get(path)
    if handler is None:
        return Refusal(200, Status.UNIMPLEMENTED, _unknown(path, mapping))
    if encoding not in (None, *ENCODINGS):
        return Refusal(
            200,
            Status.UNIMPLEMENTED,
            f"grpc-encoding: {echo(encoding)!r} is not supported (supported: {', '.join(ENCODINGS)})",
        )
    assert content_type is not None
    return CallHeaders(
        path, handler, content_type, timeout, encoding == "gzip", metadata, user_agent
    )


def _unknown(path: str, mapping: dict[str, Handler]) -> str:
    service, _, method = path.lstrip("/").rpartition("/")
    if not any(p.startswith(f"/{service}/") for p in mapping):
        return f"unknown service {echo(service or path)}"
    return f"unknown method {echo(method)} for service {echo(service)}"


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress a gzip message of at most ``limit`` bytes; never holds more."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise GRPCError(Status.INVALID_ARGUMENT, "request: not valid gzip data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"request: gzip message larger than {limit} bytes once decompressed"
            " (limits.max_message_bytes)",
        )
    if not inflater.eof:
        raise GRPCError(Status.INVALID_ARGUMENT, "request: gzip data ends early")
    return out


async def _read(stream: GuardedH2Stream, size: int, offset: int, patience: float | None) -> bytes:
    try:
        if patience is None or stream.ended or stream.data_received >= offset + size:
            return await stream.recv_data(size)
        try:
            async with asyncio.timeout(patience):
                return await stream.recv_data(size)
        except TimeoutError:
            raise Stalled(STALLED) from None
    except AssertionError:  # grpclib's Buffer: the stream ended with fewer bytes
        raise GRPCError(Status.INVALID_ARGUMENT, TRUNCATED) from None


async def read_message(
    stream: GuardedH2Stream,
    codec: CodecBase,
    message_type: Any,
    *,
    gzip: bool,
    max_bytes: int,
    patience: float | None,
) -> Any:
    """The next length-prefixed message, or None when the client ended the stream.
    ``patience``: seconds for a first message to arrive in full (None: no limit)."""
    prefix = await _read(stream, 5, 0, patience)
    if not prefix:
        return None
    flag = prefix[0]
    length = int.from_bytes(prefix[1:5], "big")
    if flag > 1:
        raise GRPCError(Status.INVALID_ARGUMENT, f"request: compressed flag {flag}, not 0 or 1")
    if length > max_bytes:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"request: message of {length} bytes is larger than {max_bytes}"
            " (limits.max_message_bytes)",
        )
    data = await _read(stream, length, 5, patience) if length else b""
    if len(data) != length:  # grpclib's Buffer returns b"" at the end of the stream
        raise GRPCError(Status.INVALID_ARGUMENT, TRUNCATED)
    if flag:
        if not gzip:
            raise GRPCError(
                Status.INVALID_ARGUMENT, "request: compressed flag set without grpc-encoding"
            )
        data = gunzip(data, max_bytes)
    return codec.decode(data, message_type)


class CallStream(Stream[Any, Any]):
    """grpclib's server Stream, reading messages with read_message."""

    _gzip = False
    _max_bytes = 0
    _patience: float | None = None
    _first = True
    _on_stall: Callable[[str], None] = staticmethod(lambda reason: None)

    async def recv_message(self) -> Any:
        assert isinstance(self._stream, GuardedH2Stream)
        patience, self._patience = self._patience, None
        try:
            message = await read_message(
                self._stream,
                self._codec,
                self._recv_type,
                gzip=self._gzip,
                max_bytes=self._max_bytes,
                patience=patience,
            )
        except Stalled as err:
            # Closing the connection cancels this call too; the status is for the log.
            self._on_stall(str(err))
            raise GRPCError(Status.CANCELLED, str(err)) from None
        if message is None:
            if self._first and not self._cardinality.client_streaming:
                raise GRPCError(
                    Status.INVALID_ARGUMENT, "request: the stream ended before a message"
                )
            return None
        self._first = False
        (message,) = await self._dispatch.recv_message(message)
        self._messages_received += 1
        return message


async def _refuse(stream: protocol.Stream, refusal: Refusal) -> None:
    headers = [
        (":status", str(refusal.http_status)),
        ("content-type", GRPC_CONTENT_TYPE),
        ("grpc-status", str(refusal.status.value)),
        ("grpc-message", encode_grpc_message(status_message(refusal.message))),
    ]
    await stream.send_headers(headers, end_stream=True)
    if stream.closable:
        stream.reset_nowait()


@dataclass(frozen=True, slots=True)
class CallLimits:
    max_message_bytes: int
    handshake_timeout: float
    on_stall: Callable[[str], None]


async def handle_request(
    mapping: dict[str, Handler],
    h2_stream: GuardedH2Stream,
    headers: _Headers,
    codec: CodecBase,
    status_details_codec: StatusDetailsCodecBase | None,
    dispatch: _DispatchServerEvents,
    release_stream: Callable[[], Any],
    limits: CallLimits,
) -> None:
    try:
        call = check_headers(headers, mapping, codec.__content_subtype__)
        if isinstance(call, Refusal):
            await _refuse(h2_stream, call)
            return
        deadline = None if call.timeout is None else Deadline.from_timeout(call.timeout)
        if deadline is not None and not deadline.time_remaining():
            await _refuse(h2_stream, Refusal(200, Status.DEADLINE_EXCEEDED, "deadline exceeded"))
            return
        method = call.handler
        stream = CallStream(
            h2_stream,
            call.path,
            method.cardinality,
            method.request_type,
            method.reply_type,
            codec=codec,
            status_details_codec=status_details_codec,
            dispatch=dispatch,
            deadline=deadline,
            user_agent=call.user_agent,
        )
        stream._gzip = call.gzip
        h2_stream.corked = not method.cardinality.server_streaming
        stream._max_bytes = limits.max_message_bytes
        stream._patience = limits.handshake_timeout
        stream._on_stall = limits.on_stall
        async with stream:
            wrapper: Wrapper
            deadline_wrapper: AbstractContextManager[Any]
            if deadline is None:
                wrapper = h2_stream.wrapper = Wrapper()
                deadline_wrapper = nullcontext()
            else:
                wrapper = h2_stream.wrapper = DeadlineWrapper()
                deadline_wrapper = wrapper.start(deadline)
            try:
                with deadline_wrapper, wrapper:
                    stream.metadata, method_func = await dispatch.recv_request(
                        call.metadata,
                        method.func,
                        method_name=call.path,
                        deadline=deadline,
                        content_type=call.content_type,
                        user_agent=call.user_agent,
                        peer=stream.peer,
                    )
                    try:
                        await method_func(stream)
                    finally:
                        h2_stream.handled = True
            except TimeoutError:
                if wrapper.cancelled or (deadline is not None and not deadline.time_remaining()):
                    raise GRPCError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
                raise
    except h2.exceptions.StreamClosedError:
        pass  # the client reset the stream: no one is left to answer
    except h2.exceptions.ProtocolError:
        if not h2_stream.connection.is_closing():  # else: the connection closed under us
            log.exception("grpc call failed outside its handler")
    except Exception:
        log.exception("grpc call failed outside its handler")
    finally:
        release_stream()
