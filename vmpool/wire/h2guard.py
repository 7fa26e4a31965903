"""HTTP/2 connection limits around grpclib and h2, which have no hooks for them.

``GuardedServer`` is grpclib's Server with its own protocol: every frame event
h2 produces passes ``GuardedProtocol._feed`` before grpclib sees it, and the
limits of identity.md sections 5-6 hold there, per connection:

- ``max_connections`` per process; over it a new connection gets GOAWAY and is
  closed at once.
- ``max_concurrent_streams`` advertised in SETTINGS (h2 enforces it).
- rapid reset: RST_STREAMs from the client spend a budget (a burst of twice
  max_concurrent_streams, refilled at max_concurrent_streams a second).
- PING flood: a PING less than a second after the previous one, with nothing
  sent by us in between, is a strike (grpc-go's rule, looser); too many strikes
  and the connection is closed with debug data ``too_many_pings``. Keepalive
  (grpc-go allows at most one every 10 s) and BDP pings (answering our data)
  never strike.
- SETTINGS, PRIORITY, unsolicited PING ACK and empty DATA frames spend a small
  control budget.
- no HTTP/2 preface within ``handshake_timeout``: closed. A first request
  message not complete within it: see vmpool.wire.grpcframe.
- no stream for ``idle_timeout``: GOAWAY NO_ERROR and closed.

Past a limit the connection gets GOAWAY ENHANCE_YOUR_CALM and is closed; its
calls are cancelled and its memory freed. h2 is fed at most SLICE bytes at a
time so a flood is judged after a few hundred frames, not after a whole read.

``GuardedServer.goaway()`` starts a graceful shutdown: a GOAWAY on each
connection naming the last stream it will serve; calls in flight finish,
then the connection is closed. grpclib clients are the exception: on a GOAWAY
grpclib fails every call on the connection, even one whose answer arrived in
the same read, so their connections get no GOAWAY; their calls finish, new
ones get UNAVAILABLE from the draining server, and the connections close at
the end of shutdown (without a GOAWAY either). Before that close, shutdown
waits until the calls whose handlers returned have written their answers
(``answered``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection
from typing import Any

import structlog
from grpclib.config import Configuration
from grpclib.const import Handler as MethodHandler
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.events import _DispatchServerEvents
from grpclib.protocol import AbstractHandler, Connection, EventsProcessor, H2Protocol, _set_nodelay
from grpclib.server import Handler, Server
from grpclib.utils import Wrapper
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    PingAckReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    SettingsAcknowledged,
    StreamReset,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from vmpool.wire.grpcframe import CallLimits, GuardedH2Stream, handle_request
from vmpool.wire.h2limits import Budget, GuardSettings, PingPolicy

log = structlog.get_logger("vmpool.h2guard")

SLICE = 4096  # bytes handed to h2 at once: a flood is judged every ~240 frames
MAX_HEADER_LIST = 64 * 1024  # what h2 advertises by default, kept
LINGER = 1.0  # seconds a closing connection's input is still read (and dropped)


class GuardedConnection(Connection):
    """grpclib's Connection, making guarded streams and noting what it sends."""

    sent_since_ping = False

    def create_stream(
        self, *, stream_id: int | None = None, wrapper: Wrapper | None = None
    ) -> GuardedH2Stream:
        return GuardedH2Stream(
            self, self._connection, self._transport, stream_id=stream_id, wrapper=wrapper
        )

    def headers_send_process(self) -> None:
        self.ping_count_in_sequence = 0
        self.sent_since_ping = True

    def data_send_process(self) -> None:
        super().data_send_process()
        self.sent_since_ping = True


class GuardedHandler(Handler):
    """grpclib's per-connection Handler, running calls through grpcframe."""

    def __init__(
        self,
        mapping: dict[str, MethodHandler],
        codec: CodecBase,
        status_details_codec: StatusDetailsCodecBase | None,
        dispatch: _DispatchServerEvents,
        limits: CallLimits,
    ) -> None:
        super().__init__(mapping, codec, status_details_codec, dispatch)
        self.limits = limits

    def accept(
        self, stream: Any, headers: list[tuple[str, str]], release_stream: Callable[[], Any]
    ) -> None:
        self.__gc_step__()
        self._tasks[stream] = self.loop.create_task(
            handle_request(
                self.mapping,
                stream,
                headers,
                self.codec,
                self.status_details_codec,
                self.dispatch,
                release_stream,
                self.limits,
            )
        )


class GuardedProtocol(H2Protocol):
    connection: GuardedConnection

    def __init__(
        self,
        handler: AbstractHandler,
        config: Configuration,
        h2_config: H2Configuration,
        settings: GuardSettings,
        connections: set[GuardedProtocol],
    ) -> None:
        super().__init__(handler, config, h2_config)
        self.settings = settings
        self._connections = connections
        self._closed = False
        self._draining = False
        self._last_stream = 0
        self._preface_seen = False
        self._timer: asyncio.TimerHandle | None = None
        self._pings = PingPolicy(settings.min_ping_interval, settings.ping_strikes)
        self._grpclib_peer: bool | None = None  # unknown until its first request
        self._goaway_sent = False  # the graceful one (shutdown)
        self.gone = asyncio.Event()  # set once the socket is closed
        self.released = asyncio.Event()  # a stream released while draining

    # -- connection lifecycle --------------------------------------------

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _set_nodelay(sock)
        s = self.settings
        h2 = self._h2 = H2Connection(config=self.h2_config)
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        h2.initiate_connection()
        initial = h2.local_settings.initial_window_size
        conn_delta = self.config.http2_connection_window_size - initial
        if conn_delta:
            h2.increment_flow_control_window(conn_delta)
        if self.config.http2_stream_window_size != initial:
            h2.update_settings(
                {SettingCodes.INITIAL_WINDOW_SIZE: self.config.http2_stream_window_size}
            )
        self.connection = GuardedConnection(h2, transport, config=self.config)
        self.processor = GuardedProcessor(self.handler, self.connection, self)
        now = time.monotonic()
        self._resets = Budget(s.reset_burst, s.reset_rate, now)
        self._control = Budget(s.control_burst, s.control_rate, now)
        self._last_active = now
        if len(self._connections) >= s.max_connections:
            self._goaway_and_close(
                ErrorCodes.ENHANCE_YOUR_CALM, "max_connections", "limits.max_connections reached"
            )
            return
        self._connections.add(self)
        self.connection.flush()
        self._timer = asyncio.get_running_loop().call_later(s.handshake_timeout, self._tick)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._close("Connection lost")

    def _close(self, reason: str) -> None:
        self._closed = True
        self.gone.set()
        self.released.set()
        self._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if hasattr(self.processor, "processors"):  # grpclib deletes it once closed
            self.processor.close(reason)  # closes the transport, cancels the calls

    def _goaway_and_close(self, code: ErrorCodes, debug: str, reason: str) -> None:
        """GOAWAY, stop the calls; close the socket LINGER seconds later.

        Closing a socket with unread input makes the kernel send RST, and the
        client's kernel then drops what the client had not read yet: the GOAWAY
        saying why. So what still arrives is read and dropped (not parsed) for a
        moment before the close."""
        if self._closed:
            return
        if self.connection.is_closing():
            self._close(reason)
            return
        self.connection.flush()
        frame = GoAwayFrame(
            0,
            last_stream_id=self._h2.highest_inbound_stream_id,
            error_code=code,
            additional_data=debug.encode(),
        )
        self.connection._transport.write(frame.serialize())
        self._linger(reason)

    def _linger(self, reason: str) -> None:
        self.connection.write_ready.clear()  # grpclib writes nothing more (the calls wait)
        self._closed = True  # data_received drops what comes now
        self.released.set()
        self._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self.handler.close()  # cancels the calls
        self._timer = asyncio.get_running_loop().call_later(LINGER, self._close, reason)

    def calm(self, reason: str) -> None:
        """Past a limit: GOAWAY ENHANCE_YOUR_CALM and close."""
        if self._closed:
            return
        peer = self.connection.get_peer().addr()
        log.warning(
            "connection closed",
            reason=reason,
            peer=f"{peer[0]}:{peer[1]}" if peer else "",
        )
        self._goaway_and_close(ErrorCodes.ENHANCE_YOUR_CALM, reason.partition(":")[0], reason)

    def goaway(self) -> None:
        """Graceful shutdown: serve the streams begun so far, refuse later ones."""
        if self._closed or self._draining:
            return
        self._draining = True
        if self._grpclib_peer is not False:
            # A grpclib client (see the module docstring), or one that has sent
            # no request yet: its first may be on the way, and grpclib would fail it.
            return
        if not self.processor.streams:
            self._goaway_and_close(ErrorCodes.NO_ERROR, "shutdown", "server shutting down")
            return
        self._last_stream = self._h2.highest_inbound_stream_id
        self.connection.flush()
        frame = GoAwayFrame(0, last_stream_id=self._last_stream, error_code=ErrorCodes.NO_ERROR)
        self.connection._transport.write(frame.serialize())
        self._goaway_sent = True

    async def answered(self) -> None:
        """Until the calls handled by now have written their answers (their
        streams released) or the connection closes. Streams whose handler still
        runs (a health Watch) are not waited for."""
        pending = {i for i, s in self.processor.streams.items() if getattr(s, "handled", False)}
        while not self._closed and pending & self.processor.streams.keys():
            self.released.clear()
            await self.released.wait()

    def stream_released(self) -> None:
        if self._draining:
            self.released.set()
        if self._goaway_sent and not self.processor.streams:
            self._goaway_and_close(ErrorCodes.NO_ERROR, "shutdown", "server shutting down")

    def close(self) -> None:
        """End of shutdown: close, whatever is still open. A grpclib client gets
        no GOAWAY here either: read with the drain's last answers, it would fail
        them; the socket closes LINGER seconds after them instead."""
        if self._grpclib_peer and not self._closed and not self.connection.is_closing():
            self.connection.flush()
            self._linger("server shut down")
            return
        self._goaway_and_close(ErrorCodes.NO_ERROR, "shutdown", "server shut down")

    def resume_writing(self) -> None:
        if not self._closed:
            super().resume_writing()

    def _tick(self) -> None:
        """Handshake, then idle checks: one timer per connection."""
        self._timer = None
        if self._closed:
            return
        s = self.settings
        if not self._preface_seen:
            self._goaway_and_close(
                ErrorCodes.ENHANCE_YOUR_CALM, "handshake_timeout", "no HTTP/2 preface in time"
            )
            return
        now = time.monotonic()
        if self.processor.streams:
            self._last_active = now
        elif now - self._last_active >= s.idle_timeout:
            self._goaway_and_close(ErrorCodes.NO_ERROR, "idle_timeout", "idle")
            return
        wait = max(s.idle_timeout - (now - self._last_active), 0.01)
        self._timer = asyncio.get_running_loop().call_later(wait, self._tick)

    # -- frames ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if len(data) <= SLICE:
            self._feed(data)
            return
        for start in range(0, len(data), SLICE):
            if self._closed:
                return
            self._feed(data[start : start + SLICE])

    def _feed(self, data: bytes) -> None:
        try:
            events: list[Any] = self._h2.receive_data(data)
        except ProtocolError as err:
            self.connection.flush()  # h2 queued a GOAWAY naming the error
            self._linger(f"protocol error: {type(err).__name__}")
            return
        self.connection.flush()
        process = self.processor.process
        for event in events:
            kind = type(event)
            watched = kind in _WATCHED or (kind is DataReceived and not event.data)
            if watched and not self._admit(event):
                if self._closed:
                    return
                continue
            process(event)
        self.connection.flush()

    def _admit(self, event: Any) -> bool:
        """Whether grpclib should see ``event``; enforces the limits."""
        kind = type(event)
        if kind is RequestReceived:
            self._last_active = time.monotonic()
            if self._grpclib_peer is None:
                agent = next((v for k, v in event.headers if k == "user-agent"), "")
                self._grpclib_peer = agent.startswith("grpc-python-grpclib")
            if self._goaway_sent and event.stream_id > self._last_stream:
                # A stream begun as our GOAWAY crossed. Its client may have reset
                # it already, in this same read (grpcio does): h2 then refuses to
                # reset it again, and that error must not cost the connection.
                with contextlib.suppress(StreamClosedError):
                    self._h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                return False
            return True
        if kind is StreamReset:
            if event.remote_reset and not self._resets.spend(time.monotonic()):
                self.calm("rapid_reset: too many RST_STREAM frames")
                return False
            return True
        if kind is PingReceived:
            sent_data, self.connection.sent_since_ping = self.connection.sent_since_ping, False
            if not self._pings.allow(time.monotonic(), sent_data):
                self.calm("too_many_pings")
                return False
            return True
        if kind is RemoteSettingsChanged:
            self._preface_seen = True
        if not self._control.spend(time.monotonic()):
            self.calm("control_flood: too many SETTINGS/PRIORITY/PING ACK/empty DATA frames")
            return False
        if kind is DataReceived:
            # An empty DATA frame: grpclib would take it for the end of the stream.
            if event.flow_controlled_length:
                self.connection.ack(event.stream_id, event.flow_controlled_length)
            return False
        return True


class GuardedProcessor(EventsProcessor):
    """grpclib's event processor, telling the guard when a call's stream is done."""

    def __init__(
        self, handler: AbstractHandler, connection: Connection, guard: GuardedProtocol
    ) -> None:
        super().__init__(handler, connection)
        self._guard = guard

    def register(self, stream: Any) -> Callable[[], None]:
        release = super().register(stream)
        guard = self._guard

        def released() -> None:
            release()
            guard.stream_released()

        return released


_WATCHED = frozenset(
    {
        RequestReceived,
        StreamReset,
        PingReceived,
        PingAckReceived,
        RemoteSettingsChanged,
        SettingsAcknowledged,
        PriorityUpdated,
    }
)


class GuardedServer(Server):
    """grpclib's Server with GuardedProtocol connections."""

    def __init__(
        self,
        handlers: Collection[Any],
        *,
        settings: GuardSettings,
        codec: CodecBase | None = None,
        config: Configuration | None = None,
    ) -> None:
        super().__init__(handlers, codec=codec, config=config)
        # latin-1 decodes any header bytes; grpcframe refuses non-ASCII values per
        # stream (with "ascii", h2 raised and the whole connection was dropped).
        self._h2_config.header_encoding = "latin-1"
        self.settings = settings
        self.connections: set[GuardedProtocol] = set()

    def _protocol_factory(self) -> H2Protocol:
        self.__gc_step__()
        limits = CallLimits(self.settings.max_message_bytes, self.settings.handshake_timeout, _noop)
        handler = GuardedHandler(
            self._mapping, self._codec, self._status_details_codec, self.__dispatch__, limits
        )
        self._handlers.add(handler)
        proto = GuardedProtocol(
            handler, self._config, self._h2_config, self.settings, self.connections
        )
        handler.limits = CallLimits(limits.max_message_bytes, limits.handshake_timeout, proto.calm)
        return proto

    def goaway(self) -> None:
        """Start a graceful shutdown: GOAWAY on each connection. The port stays
        open until close(): health checks still answer (NOT_SERVING) and late
        calls get UNAVAILABLE rather than a refused connection."""
        for proto in list(self.connections):
            proto.goaway()

    async def answered(self, timeout: float) -> bool:
        """Wait until the calls whose handlers have returned have written their
        answers (their streams are released); False if ``timeout`` ran out.
        A call leaves the API's gate when its handler returns, before its reply
        (corked until the trailers) is written: closing the connection then
        would cut the answer of a call that was done (its Lease or Return
        committed)."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(p.answered() for p in list(self.connections))), timeout
            )
        except TimeoutError:
            return False
        return True

    async def close_connections(self) -> None:
        """End of shutdown: GOAWAY and close every connection, and give clients
        the linger time to read their last answers (a socket closed by the
        exiting process with unread input is reset, and the reset discards what
        the client had not read yet)."""
        closing = list(self.connections)
        for proto in closing:
            proto.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.gone.wait() for p in closing)), LINGER + 0.5)


def _noop(reason: str) -> None:
    pass
