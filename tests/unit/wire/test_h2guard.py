"""The HTTP/2 and gRPC guard (vmpool.wire.h2guard, vmpool.wire.grpcframe), in process: a
GuardedServer with a small echo service, driven by a raw h2 client that sends
exactly the frames each case needs, and by grpclib for the well-behaved path."""

from __future__ import annotations

import asyncio
import gzip
import struct
from collections.abc import AsyncIterator

import h2.errors
import h2.settings
import pytest
from google.protobuf.wrappers_pb2 import BytesValue
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health
from grpclib.server import Stream

from tests.h2raw import RawH2, frame, gzipped
from tests.polling import eventually
from vmpool.config.loading import parse_config
from vmpool.core.echo import echo, status_message
from vmpool.wire.grpcframe import Refusal, check_headers, gunzip, parse_timeout
from vmpool.wire.h2guard import GuardedServer
from vmpool.wire.h2limits import Budget, GuardSettings, PingPolicy

ECHO = "/test.Echo/Echo"
HOLD = "/test.Echo/Hold"
ERROR = "/test.Echo/Fail"
CHECK = "/grpc.health.v1.Health/Check"


class EchoService:
    """Echo answers its bytes back; Hold answers once released; Fail echoes its
    bytes into a status message, as a careless handler would."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = 0

    async def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(BytesValue(value=request.value))

    async def hold(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.held += 1
        await self.release.wait()
        await stream.send_message(BytesValue(value=request.value))

    async def fail(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        raise GRPCError(Status.NOT_FOUND, f"no such thing: {request.value.decode()}")

    def __mapping__(self) -> dict[str, Handler]:
        unary = Cardinality.UNARY_UNARY
        return {
            ECHO: Handler(self.echo, unary, BytesValue, BytesValue),
            HOLD: Handler(self.hold, unary, BytesValue, BytesValue),
            ERROR: Handler(self.fail, unary, BytesValue, BytesValue),
        }


class Served:
    def __init__(self, server: GuardedServer, service: EchoService, address: str) -> None:
        self.server = server
        self.service = service
        self.address = address
        self.clients: list[RawH2] = []

    async def raw(self, *, preface: bool = True) -> RawH2:
        client = await RawH2.connect(self.address, preface=preface)
        self.clients.append(client)
        return client


SMALL = GuardSettings(
    max_message_bytes=4096,
    max_concurrent_streams=20,
    max_connections=50,
    idle_timeout=30.0,
    handshake_timeout=1.0,
)


async def _serve(settings: GuardSettings) -> AsyncIterator[Served]:
    service = EchoService()
    server = GuardedServer([service, Health()], settings=settings, codec=ProtoCodec())
    await server.start("127.0.0.1", 0)
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    served = Served(server, service, f"127.0.0.1:{port}")
    try:
        yield served
    finally:
        service.release.set()
        for c in served.clients:
            await c.close()
        server.close()
        await server.close_connections()
        await server.wait_closed()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async for s in _serve(SMALL):
        yield s


def message(value: bytes) -> bytes:
    return frame(BytesValue(value=value).SerializeToString())


# --- pure pieces -----------------------------------------------------------------


def test_echo_cuts_long_values_and_says_how_long() -> None:
    assert echo("short") == "short"
    cut = echo("x" * 1_000_000)
    assert cut == "x" * 64 + "...(1000000 bytes)"
    assert echo(b"\xff" * 100).endswith("...(100 bytes)")
    assert len(status_message("y" * 100_000)) <= 1024


def test_grpc_timeout_follows_the_spec() -> None:
    assert parse_timeout("1n") == pytest.approx(1e-9)
    assert parse_timeout("20S") == 20
    assert parse_timeout("99999999H") == 99999999 * 3600
    for bad in ("", "1", "S", "123456789S", "1s", "-1S", "1.5S", "1 S"):
        with pytest.raises(ValueError):
            parse_timeout(bad)


def _headers(**extra: str) -> list[tuple[str, str]]:
    base = {
        ":method": "POST",
        ":scheme": "http",
        ":path": ECHO,
        ":authority": "t",
        "content-type": "application/grpc",
        "te": "trailers",
    }
    base.update({k.replace("_", "-"): v for k, v in extra.items()})
    return [(k, v) for k, v in base.items() if v != "<drop>"]


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({":path": "/test.Echo/Nope"}, Status.UNIMPLEMENTED, "unknown method Nope"),
        ({":path": "/no.Such/Thing"}, Status.UNIMPLEMENTED, "unknown service no.Such"),
        ({"grpc_encoding": "br"}, Status.UNIMPLEMENTED, "supported: identity, gzip"),
        ({":path": "<drop>"}, Status.INVALID_ARGUMENT, ":path"),
        ({":method": "<drop>"}, Status.INVALID_ARGUMENT, ":method"),
        ({":method": "GET"}, Status.INVALID_ARGUMENT, ":method"),
        ({"content_type": "<drop>"}, Status.INVALID_ARGUMENT, "content-type: missing"),
        ({"content_type": "text/html"}, Status.INVALID_ARGUMENT, "content-type"),
        ({"grpc_timeout": "1x"}, Status.INVALID_ARGUMENT, "grpc-timeout"),
        ({"grpc_timeout": "123456789S"}, Status.INVALID_ARGUMENT, "grpc-timeout"),
        ({"x_meta": "caf\xe9"}, Status.INVALID_ARGUMENT, "x-meta"),
        ({"x_meta": "a\x01b"}, Status.INVALID_ARGUMENT, "x-meta"),
        ({"x_meta_bin": "!!!"}, Status.INVALID_ARGUMENT, "x-meta-bin"),
    ],
)
def test_request_headers_refused_with_a_status_naming_the_header(
    change: dict[str, str], status: Status, needle: str
) -> None:
    got = check_headers(_headers(**change), EchoService().__mapping__(), "proto")
    assert isinstance(got, Refusal)
    assert got.status is status
    assert needle in got.message


def test_request_headers_accepted() -> None:
    got = check_headers(
        _headers(grpc_encoding="gzip", grpc_timeout="5S", x_a="b", x_b_bin="AAE"),
        EchoService().__mapping__(),
        "proto",
    )
    assert not isinstance(got, Refusal)
    assert got.gzip
    assert got.timeout == 5
    assert got.metadata["x-a"] == "b"
    assert got.metadata["x-b-bin"] == b"\x00\x01"


def test_gunzip_is_bounded_by_the_limit() -> None:
    assert gunzip(gzip.compress(b"abc"), 10) == b"abc"
    bomb = gzip.compress(b"\0" * 10_000_000)  # ~10 KB that inflates to 10 MB
    with pytest.raises(GRPCError) as err:
        gunzip(bomb, 65536)
    assert err.value.status is Status.RESOURCE_EXHAUSTED
    with pytest.raises(GRPCError) as err:
        gunzip(b"not gzip", 65536)
    assert err.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(GRPCError) as err:
        gunzip(gzip.compress(b"abc" * 100)[:-12], 65536)
    assert err.value.status is Status.INVALID_ARGUMENT


def test_budget_refills_at_its_rate() -> None:
    budget = Budget(3, 1.0, now=0.0)
    assert [budget.spend(0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.spend(1.0)  # one token back after a second
    assert not budget.spend(1.0)


# --- over the wire: standard gRPC -------------------------------------------------


async def test_well_behaved_client_gets_answers(served: Served) -> None:
    channel = Channel("127.0.0.1", int(served.address.rsplit(":", 1)[1]))
    try:
        async with channel.request(ECHO, Cardinality.UNARY_UNARY, BytesValue, BytesValue) as call:
            await call.send_message(BytesValue(value=b"hello"), end=True)
            reply = await call.recv_message()
            await call.recv_trailing_metadata()
        assert reply is not None
        assert reply.value == b"hello"
    finally:
        channel.close()


async def test_unknown_method_is_unimplemented_with_grpc_content_type(served: Served) -> None:
    raw = await served.raw()
    answer = await raw.call("/test.Echo/Nope", message(b""))
    assert answer.status == Status.UNIMPLEMENTED.value
    assert answer.header("content-type") == "application/grpc"
    assert "unknown method Nope" in answer.message


async def test_gzip_request_accepted_and_encodings_advertised(served: Served) -> None:
    raw = await served.raw()
    body = BytesValue(value=b"zipped").SerializeToString()
    answer = await raw.call(ECHO, gzipped(body), [("grpc-encoding", "gzip")])
    assert answer.status == Status.OK.value, answer
    assert BytesValue.FromString(answer.data[5:]).value == b"zipped"
    assert answer.header("grpc-accept-encoding") == "identity,gzip"


async def test_unsupported_encoding_is_unimplemented_naming_the_supported(served: Served) -> None:
    raw = await served.raw()
    answer = await raw.call(ECHO, message(b"x"), [("grpc-encoding", "snappy")])
    assert answer.status == Status.UNIMPLEMENTED.value
    assert "identity, gzip" in answer.message


@pytest.mark.parametrize(
    ("payload", "extra", "status"),
    [
        (frame(b"\x0a\x05hel", length=7), [], Status.INVALID_ARGUMENT),  # truncated
        (frame(b"", length=100), [], Status.INVALID_ARGUMENT),  # length past the data
        (b"\x00\x00", [], Status.INVALID_ARGUMENT),  # a piece of a length prefix
        (frame(b"\x0a\x01x", compressed=True), [], Status.INVALID_ARGUMENT),  # no encoding
        (b"\x02" + frame(b"")[1:], [], Status.INVALID_ARGUMENT),  # flag neither 0 nor 1
        (
            frame(b"\x0a\x01x", compressed=True),
            [("grpc-encoding", "gzip")],
            Status.INVALID_ARGUMENT,
        ),
        (None, [], Status.INVALID_ARGUMENT),  # no message at all (END_STREAM on HEADERS)
        (b"", [], Status.INVALID_ARGUMENT),  # no message at all (empty DATA + END_STREAM)
        (frame(b"", length=10_000_000), [], Status.RESOURCE_EXHAUSTED),  # from the prefix
        (
            gzipped(b"\x0a\x80\x80\x04" + b"a" * 65536),
            [("grpc-encoding", "gzip")],
            Status.RESOURCE_EXHAUSTED,
        ),
    ],
)
async def test_malformed_framing_answered_per_stream(
    served: Served, payload: bytes | None, extra: list[tuple[str, str]], status: Status
) -> None:
    raw = await served.raw()
    answer = await raw.call(ECHO, payload, extra)
    assert answer.status == status.value, answer
    assert (answer.header("content-type") or "").startswith("application/grpc")
    # The connection is still usable.
    again = await raw.call(ECHO, message(b"ok"))
    assert again.status == Status.OK.value


async def test_bad_headers_answered_per_stream_and_the_connection_stays(served: Served) -> None:
    raw = await served.raw()
    cases = [
        ([("x-meta", "caf\xe9")], None),
        ([("grpc-timeout", "1x")], None),
        ([], [(":method", "POST"), (":scheme", "http"), (":authority", "t")]),  # no :path
    ]
    for extra, base in cases:
        sid = raw.headers(ECHO, extra, base=base)
        raw.data(sid, message(b"x"))
        await raw.flush()
        answer = await raw.wait(sid)
        assert answer.status == Status.INVALID_ARGUMENT.value, (extra, base, answer)
    assert (await raw.call(ECHO, message(b"ok"))).status == Status.OK.value


async def test_tiny_grpc_timeout_is_deadline_exceeded(served: Served) -> None:
    raw = await served.raw()
    answer = await raw.call(HOLD, message(b"x"), [("grpc-timeout", "1n")])
    assert answer.status == Status.DEADLINE_EXCEEDED.value


async def test_long_status_message_is_cut(served: Served) -> None:
    raw = await served.raw()
    answer = await raw.call(ERROR, message(b"n" * 3000))
    assert answer.status == Status.NOT_FOUND.value
    assert len(answer.header("grpc-message") or "") <= 1024
    assert "bytes)" in answer.message


# --- over the wire: connection limits -------------------------------------------


async def test_max_concurrent_streams_is_advertised(served: Served) -> None:
    raw = await served.raw()
    await raw.receive(timeout=5)
    assert raw.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 20


async def test_rapid_reset_gets_enhance_your_calm(served: Served) -> None:
    raw = await served.raw()
    for _ in range(1000):
        sid = raw.headers(HOLD)
        raw.h2.reset_stream(sid)
    await raw.flush()
    await raw.until_closed()
    assert raw.goaway is not None
    assert raw.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    await eventually(
        lambda: asyncio.sleep(0, len(served.server.connections)), lambda n: n == 0, 5, "closed"
    )
    # Others are still served.
    other = await served.raw()
    assert (await other.call(ECHO, message(b"ok"))).status == Status.OK.value


async def test_ping_flood_gets_enhance_your_calm(served: Served) -> None:
    raw = await served.raw()
    for i in range(5000):
        raw.h2.ping(struct.pack(">Q", i))
    await raw.flush()
    await raw.until_closed()
    assert raw.goaway is not None
    assert raw.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert raw.goaway.additional_data == b"too_many_pings"
    assert raw.pings_acked < 5000


async def test_keepalive_pings_between_calls_are_fine(served: Served) -> None:
    raw = await served.raw()
    for i in range(30):
        raw.h2.ping(struct.pack(">Q", i))  # each after data from the server: no strike
        assert (await raw.call(ECHO, message(b"ok"))).status == Status.OK.value
    assert raw.goaway is None


async def test_settings_flood_gets_enhance_your_calm(served: Served) -> None:
    raw = await served.raw()
    for _ in range(2000):
        raw.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10})
        raw.h2.local_settings.acknowledge()
    await raw.flush()
    await raw.until_closed()
    assert raw.goaway is not None
    assert raw.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_silent_connection_is_closed_after_handshake_timeout(served: Served) -> None:
    raw = await served.raw(preface=False)
    await raw.until_closed(timeout=10)
    assert not served.server.connections


async def test_stream_that_never_sends_its_message_closes_the_connection(served: Served) -> None:
    raw = await served.raw()
    raw.headers(ECHO)  # HEADERS, then nothing
    raw.data(raw.headers(ECHO), message(b"x")[:3], end_stream=False)  # half a prefix
    await raw.flush()
    await raw.until_closed(timeout=10)
    assert raw.goaway is not None
    assert raw.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_idle_connection_is_closed() -> None:
    async for s in _serve(GuardSettings(idle_timeout=0.5, handshake_timeout=0.2)):
        raw = await s.raw()
        assert (await raw.call(ECHO, message(b"ok"))).status == Status.OK.value
        await raw.until_closed(timeout=10)
        assert raw.goaway is not None
        assert raw.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR


async def test_max_connections() -> None:
    async for s in _serve(GuardSettings(max_connections=3)):
        kept = [await s.raw() for _ in range(3)]
        for c in kept:
            assert (await c.call(ECHO, message(b"ok"))).status == Status.OK.value
        extra = await s.raw()
        await extra.until_closed()
        assert extra.goaway is not None
        assert extra.goaway.additional_data == b"max_connections"
        assert (await kept[0].call(ECHO, message(b"ok"))).status == Status.OK.value


async def test_graceful_goaway_lets_calls_in_flight_finish(served: Served) -> None:
    raw = await served.raw()
    sid = raw.headers(HOLD)
    raw.data(sid, message(b"held"))
    await raw.flush()
    await eventually(lambda: asyncio.sleep(0, served.service.held), lambda n: n == 1, 5, "held")
    served.server.goaway()
    while raw.goaway is None and not raw.closed:
        await raw.receive(timeout=5)
    assert raw.goaway is not None
    assert raw.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert raw.goaway.last_stream_id == sid
    served.service.release.set()
    await raw.until_closed()
    # h2 (the client here) takes no frame after a GOAWAY: the answer came as bytes,
    # then the server closed the connection.
    assert b"held" in (raw.unparsed or b"")


async def test_a_stream_opened_and_reset_as_the_goaway_crossed_costs_no_call(
    served: Served,
) -> None:
    """A client that opened a stream as the graceful GOAWAY crossed cancels it when
    the GOAWAY arrives (grpcio does, for a stream past the GOAWAY's last id); its
    HEADERS and RST_STREAM can reach the server in one read. Refusing that stream
    raised inside h2 and cut the connection, with the calls still in flight on it."""
    raw = await served.raw()
    sid = raw.headers(HOLD)
    raw.data(sid, message(b"held"))
    await raw.flush()
    await eventually(lambda: asyncio.sleep(0, served.service.held), lambda n: n == 1, 5, "held")
    late = raw.headers(HOLD)
    raw.data(late, message(b"late"))
    raw.h2.reset_stream(late)
    crossing = raw.h2.data_to_send()  # sent only once the GOAWAY is in
    served.server.goaway()
    while raw.goaway is None and not raw.closed:
        await raw.receive(timeout=5)
    assert raw.goaway is not None
    assert raw.goaway.last_stream_id == sid
    raw.write_raw(crossing)
    await raw.writer.drain()

    async def crossed() -> bool:  # the server has read the crossing frames (or hung up)
        await asyncio.sleep(0.01)
        seen = (p._h2.highest_inbound_stream_id for p in served.server.connections)
        return raw.closed or any(s >= late for s in seen)

    await eventually(crossed, bool, 10, "the server read the crossing frames")
    served.service.release.set()
    await raw.until_closed()
    assert b"held" in (raw.unparsed or b""), "the call in flight lost its answer"
    assert served.service.held == 1, "the stream past the GOAWAY was served"


async def test_too_many_concurrent_streams_gets_goaway(served: Served) -> None:
    raw = await served.raw()
    await eventually(lambda: asyncio.sleep(0, raw.remote_settings), bool, 5, "SETTINGS")
    # Ignore what the server said.
    raw.h2.remote_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000}
    )
    for _ in range(SMALL.max_concurrent_streams + 1):
        raw.data(raw.headers(HOLD), message(b"x"))
    await raw.flush()
    await raw.until_closed()
    assert raw.goaway is not None
    assert raw.goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


@pytest.mark.parametrize("every", [2.0, 10.0])  # grpcio keepalive in our tests; grpc-go's least
def test_keepalive_pings_are_allowed_at_the_servers_settings(every: float) -> None:
    """The PING policy with the settings `vmpool serve` runs with, on a clock
    the test moves: keepalive without calls for an hour is never refused; the
    same pings ten times as often are, after the forgiven strikes."""
    settings = GuardSettings.from_limits(parse_config({}).limits)
    policy = PingPolicy(settings.min_ping_interval, settings.ping_strikes)
    assert all(policy.allow(i * every, sent_data_since=False) for i in range(int(3600 / every)))
    fast = PingPolicy(settings.min_ping_interval, settings.ping_strikes)
    answers = [fast.allow(i * every / 20, sent_data_since=False) for i in range(100)]
    assert False in answers
    assert answers.index(False) == settings.ping_strikes + 1
    # Any number of pings close together, each after the server sent data.
    busy = PingPolicy(settings.min_ping_interval, settings.ping_strikes)
    assert all(busy.allow(i * 0.001, sent_data_since=True) for i in range(1000))


async def test_keepalive_pings_without_calls_are_fine() -> None:
    # grpc-go keepalive with no call in flight: a PING every interval, no data.
    async for s in _serve(GuardSettings(min_ping_interval=0.05, ping_strikes=2)):
        raw = await s.raw()
        for i in range(8):
            raw.h2.ping(struct.pack(">Q", i))
            await raw.flush()
            await asyncio.sleep(0.1)
        assert (await raw.call(ECHO, message(b"ok"))).status == Status.OK.value
        assert raw.goaway is None
        assert raw.pings_acked == 8


def test_limits_config_is_checked() -> None:
    from vmpool.config.loading import ConfigError, parse_config

    limits = parse_config({}).limits
    assert (limits.max_message_bytes, limits.max_concurrent_streams) == (65536, 100)
    settings = GuardSettings.from_limits(limits)
    assert (settings.idle_timeout, settings.handshake_timeout) == (300.0, 10.0)
    for bad in (
        {"idle_timeout": "0s"},
        {"handshake_timeout": "2d"},
        {"max_message_bytes": 10},
        {"max_concurrent_streams": 0},
    ):
        with pytest.raises(ConfigError, match=f"limits.{next(iter(bad))}"):
            parse_config({"limits": bad})


async def test_empty_data_frames_are_dropped_and_a_flood_of_them_cut_off(served: Served) -> None:
    raw = await served.raw()
    sid = raw.headers(ECHO)
    raw.data(sid, b"", end_stream=False)  # grpclib alone took this for the end of the data
    raw.data(sid, message(b"after"))
    await raw.flush()
    answer = await raw.wait(sid)
    assert answer.status == Status.OK.value, answer
    sid = raw.headers(HOLD)
    for _ in range(1000):
        raw.data(sid, b"", end_stream=False)
    await raw.flush()
    await raw.until_closed()
    assert raw.goaway is not None
    assert raw.goaway.additional_data == b"control_flood"
