"""A raw HTTP/2 client (h2 over an asyncio socket) for framing and flood tests:
it sends exactly the frames a test asks for, well-formed or not."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import struct
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


def frame(message: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message (the length may lie)."""
    size = len(message) if length is None else length
    return struct.pack(">?I", compressed, size) + message


def gzipped(message: bytes) -> bytes:
    return frame(gzip.compress(message), compressed=True)


@dataclass
class Answer:
    """What came back on one stream."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    reset: int | None = None  # RST_STREAM error code
    ended: bool = False

    def header(self, name: str) -> str | None:
        for key, value in [*self.headers, *self.trailers]:
            if key == name:
                return value
        return None

    @property
    def status(self) -> int | None:
        value = self.header("grpc-status")
        return None if value is None else int(value)

    @property
    def message(self) -> str:
        return unquote(self.header("grpc-message") or "")


def _find_goaway(data: bytes) -> Any:
    view = memoryview(data)
    while len(view) >= 9:
        header, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        if len(view) < 9 + length:
            return None
        if isinstance(header, hyperframe.frame.GoAwayFrame):
            header.parse_body(view[9 : 9 + length])
            return header
        view = view[9 + length :]
    return None


class RawH2:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.answers: dict[int, Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.remote_settings: dict[int, int] = {}
        self.pings_acked = 0
        self.unparsed: bytes | None = None  # what came after h2 gave up (after a GOAWAY)

    @classmethod
    async def connect(cls, address: str, *, preface: bool = True) -> RawH2:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        conn = cls(reader, writer)
        conn._start()
        if preface:
            conn.h2.initiate_connection()
            await conn.flush()
        return conn

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)
            try:
                await self.writer.drain()
            except ConnectionError:
                self.closed = True
        await asyncio.sleep(0)  # let the reader take what came meanwhile

    def write_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def headers(
        self,
        path: str,
        extra: list[tuple[str, str]] | None = None,
        *,
        end_stream: bool = False,
        base: list[tuple[str, str]] | None = None,
    ) -> int:
        sid = self.h2.get_next_available_stream_id()
        pseudo = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "t")]
        hdrs = (pseudo if base is None else base) + GRPC_HEADERS + (extra or [])
        self.h2.send_headers(sid, hdrs, end_stream=end_stream)
        self.answers[sid] = Answer()
        return sid

    def data(self, sid: int, payload: bytes, *, end_stream: bool = True) -> None:
        self.h2.send_data(sid, payload, end_stream=end_stream)

    async def call(
        self,
        path: str,
        payload: bytes | None,
        extra: list[tuple[str, str]] | None = None,
        *,
        timeout: float = 10.0,
    ) -> Answer:
        sid = self.headers(path, extra, end_stream=payload is None)
        if payload is not None:
            self.data(sid, payload)
        await self.flush()
        return await self.wait(sid, timeout)

    async def wait(self, sid: int, timeout: float = 10.0) -> Answer:
        answer = self.answers[sid]
        async with asyncio.timeout(timeout):
            while not (answer.ended or answer.reset is not None) and not self.closed:
                await self.receive()
        return answer

    def _start(self) -> None:
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read_all())

    async def _read_all(self) -> None:
        """Read and handle everything the server sends, as it comes (a flooding
        test still sees the GOAWAY that arrives while it writes)."""
        while not self.closed:
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
            elif self.unparsed is not None:
                self.unparsed += data
            else:
                try:
                    for event in self.h2.receive_data(data):
                        self._note(event)
                except h2.exceptions.ProtocolError:
                    # h2 takes nothing after a GOAWAY (and drops the whole read with
                    # it): keep the bytes, and find the GOAWAY in them.
                    self.unparsed = data
                    self.goaway = self.goaway or _find_goaway(data)
                pending = self.h2.data_to_send()
                if pending:
                    self.writer.write(pending)
            self._changed.set()

    async def receive(self, timeout: float | None = None) -> None:
        """Wait until something more came from the server (or it closed)."""
        if self.closed:
            return
        async with asyncio.timeout(timeout):
            await self._changed.wait()
        self._changed.clear()

    async def until_closed(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.closed:
                await self.receive()

    def _note(self, event: Any) -> None:
        sid = getattr(event, "stream_id", None)
        answer = self.answers.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and answer:
            answer.headers = list(event.headers)
        elif isinstance(event, h2.events.TrailersReceived) and answer:
            answer.trailers = list(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            if answer:
                answer.data += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and answer:
            answer.ended = True
        elif isinstance(event, h2.events.StreamReset) and answer:
            answer.reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for code, change in event.changed_settings.items():
                self.remote_settings[int(code)] = change.new_value
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings_acked += 1

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
