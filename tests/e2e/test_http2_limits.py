"""Standard gRPC and bounded cost per client (lease-api.md 4a, identity.md 5-6)
against a real `vmpool serve`: grpcio for what a real client sees, a raw h2
client for framing and floods. Outcomes are asserted (statuses, GOAWAYs, a
bounded memory growth, the server still answering), never speeds."""

from __future__ import annotations

import asyncio
import gzip
import signal
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import h2.errors
import psutil
import pytest
from google.protobuf import descriptor_pb2
from grpclib.reflection.v1 import reflection_pb2

from tests.e2e.clients import SERVICE, Client, RpcError
from tests.e2e.conftest import Running
from tests.e2e.grpcio_stack import GrpcioModules
from tests.h2raw import RawH2, frame
from tests.polling import eventually

POOLS = [
    {"name": "alpha", "min_ready": 1, "max_size": 2},
    {"name": "empty", "min_ready": 0, "max_size": 0},
]
LIMITS = {"max_waiting_calls": 3, "handshake_timeout": "3s", "max_message_bytes": 65536}
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[Running]]) -> AsyncIterator[Running]:
    running = await start_server(POOLS, name="http2", limits=LIMITS)
    await running.wait_ready("alpha", 1)
    yield running
    running.assert_clean_log()


@pytest.fixture
async def channel(server: Running) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(server.address)
    yield ch
    await ch.close()


def _lease_call(channel: grpc.aio.Channel, mods: GrpcioModules) -> Any:
    return channel.unary_unary(
        f"{SERVICE}/Lease",
        request_serializer=mods.pb2.LeaseRequest.SerializeToString,
        response_deserializer=mods.pb2.LeaseResponse.FromString,
    )


async def _ping(server: Running, mods: GrpcioModules) -> str:
    async with grpc.aio.insecure_channel(server.address) as ch:
        ping = ch.unary_unary(
            f"{SERVICE}/Ping",
            request_serializer=mods.empty_pb2.Empty.SerializeToString,
            response_deserializer=mods.pb2.PingResponse.FromString,
        )
        reply = await ping(mods.empty_pb2.Empty(), timeout=10)
        return str(reply.msg)


async def _rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def _rss(server: Running) -> int:
    assert server.proc.proc is not None
    return int(psutil.Process(server.proc.proc.pid).memory_info().rss)


# --- standard gRPC, through grpcio -----------------------------------------------


async def test_unknown_method_and_service_are_unimplemented(
    channel: grpc.aio.Channel,
) -> None:
    for path, words in [
        (f"{SERVICE}/NoSuchMethod", "unknown method NoSuchMethod"),
        ("/no.such.Service/Lease", "unknown service no.such.Service"),
    ]:
        call = channel.unary_unary(path)(b"", timeout=10)
        err = await _rpc_error(call)
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
        assert words in (err.details() or "")


async def test_gzip_request_is_accepted(
    channel: grpc.aio.Channel, grpcio_modules: GrpcioModules
) -> None:
    lease = _lease_call(channel, grpcio_modules)
    err = await _rpc_error(
        lease(
            grpcio_modules.pb2.LeaseRequest(pool="nope", service_tag="gz"),
            timeout=10,
            compression=grpc.Compression.Gzip,
        )
    )
    # Decoded (else INVALID_ARGUMENT/INTERNAL): the pool name was read from the gzip body.
    assert err.code() == grpc.StatusCode.NOT_FOUND, err
    assert "nope" in (err.details() or "")


async def test_other_encoding_is_unimplemented_naming_gzip(server: Running) -> None:
    raw = await RawH2.connect(server.address)
    try:
        answer = await raw.call(f"{SERVICE}/Ping", frame(b""), [("grpc-encoding", "br")])
    finally:
        await raw.close()
    assert answer.status == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert "gzip" in answer.message
    assert "gzip" in (answer.header("grpc-accept-encoding") or "")


async def _reflect(channel: grpc.aio.Channel, *requests: Any) -> list[Any]:
    call = channel.stream_stream(
        REFLECTION,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    stream = call(iter(requests), timeout=10)
    return [reply async for reply in stream]


async def test_reflection_lists_and_describes_the_services(channel: grpc.aio.Channel) -> None:
    lease_service = SERVICE.strip("/")
    listed, described = await _reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=lease_service),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {lease_service, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
    assert "intrinsic_proto.vmpoolapi.v1.VMPoolService" in names  # grpcurl, docs/pools.md
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert {"Lease", "Return", "ExtendTo", "GetLease", "Ping", "Pools"} <= methods
    # Every service listed can be described (so `grpcurl describe` works for each).
    for name in names:
        (reply,) = await _reflect(
            channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
        )
        assert reply.HasField("file_descriptor_response"), name


# --- bounded cost per client --------------------------------------------------------


async def test_huge_pool_name_is_answered_with_a_cut_message(
    channel: grpc.aio.Channel, grpcio_modules: GrpcioModules, server: Running
) -> None:
    lease = _lease_call(grpc.aio.insecure_channel(server.address), grpcio_modules)
    name = "p" * 1_000_000  # below 4 MiB, grpcio's default; above our 64 KiB limit
    err = await _rpc_error(lease(grpcio_modules.pb2.LeaseRequest(pool=name), timeout=20))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "max_message_bytes" in (err.details() or "")
    name = "p" * 60_000  # within the limit: echoed, cut
    err = await _rpc_error(lease(grpcio_modules.pb2.LeaseRequest(pool=name), timeout=20))
    assert err.code() == grpc.StatusCode.NOT_FOUND, err
    details = err.details() or ""
    assert len(details) <= 1024
    assert "...(60000 bytes)" in details
    assert await _ping(server, grpcio_modules) == "pong"
    log = server.proc.log()
    assert max(len(line) for line in log.splitlines()) < 4096


async def test_oversized_request_is_refused_from_its_length_prefix(server: Running) -> None:
    raw = await RawH2.connect(server.address)
    try:
        sid = raw.headers(f"{SERVICE}/Lease")
        raw.data(sid, frame(b"", length=100 * 1024 * 1024)[:5], end_stream=False)  # prefix only
        await raw.flush()
        answer = await raw.wait(sid)
    finally:
        await raw.close()
    assert answer.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


@pytest.mark.parametrize(
    ("payload", "extra"),
    [
        (frame(b"\x0a\x05alp", length=7), []),  # truncated
        (frame(b"", length=50), []),  # length past the data
        (frame(gzip.compress(b"\x0a\x01x"), compressed=True), []),  # flag without encoding
        (None, []),  # no message
        (frame(b""), [("grpc-timeout", "1x")]),
        (frame(b""), [("x-note", "caf\xe9")]),
    ],
)
async def test_malformed_requests_get_invalid_argument(
    server: Running, payload: bytes | None, extra: list[tuple[str, str]]
) -> None:
    raw = await RawH2.connect(server.address)
    try:
        answer = await raw.call(f"{SERVICE}/Lease", payload, extra)
        again = await raw.call(f"{SERVICE}/Ping", frame(b""))
    finally:
        await raw.close()
    assert answer.status == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer
    assert again.status == 0, "the connection stays usable"


async def test_rapid_reset_flood_is_cut_off_and_memory_returns(
    server: Running, grpcio_modules: GrpcioModules
) -> None:
    """50,000 HEADERS+RST_STREAM (or a few more), on as many connections as it
    takes: each one is cut off with ENHANCE_YOUR_CALM, and the memory comes back."""
    before = _rss(server)
    sent = 0
    codes = []
    while sent < 50_000:
        raw = await RawH2.connect(server.address)
        try:
            while raw.goaway is None and not raw.closed:  # each one to its cut-off
                for _ in range(100):
                    raw.h2.reset_stream(raw.headers(f"{SERVICE}/Ping"))
                sent += 100
                await raw.flush()
            while raw.goaway is None and not raw.closed:
                await raw.receive(timeout=10)
        finally:
            await raw.close()
        codes.append(raw.goaway.error_code if raw.goaway else None)
    assert set(codes) == {h2.errors.ErrorCodes.ENHANCE_YOUR_CALM}, codes
    assert await _ping(server, grpcio_modules) == "pong"
    grown = await eventually(
        lambda: asyncio.sleep(0, _rss(server) - before),
        lambda g: g < 64 * 1024 * 1024,
        10,
        "the memory back within 64 MiB of where it was",
    )
    print(f"rapid reset: {sent} streams on {len(codes)} connections, RSS grew {grown} bytes")


async def test_ping_flood_is_cut_off_and_others_are_served(
    server: Running, grpcio_modules: GrpcioModules
) -> None:
    raw = await RawH2.connect(server.address)
    try:
        for i in range(300_000):
            raw.h2.ping(struct.pack(">Q", i))
            if i % 5000 == 0:
                await raw.flush()
                if raw.closed or raw.goaway:
                    break
        await raw.flush()
        await raw.until_closed(timeout=30)
    finally:
        await raw.close()
    assert raw.goaway is not None
    assert raw.goaway.additional_data == b"too_many_pings"
    assert await _ping(server, grpcio_modules) == "pong"


async def test_silent_connection_and_stalled_stream_are_closed(server: Running) -> None:
    silent = await RawH2.connect(server.address, preface=False)
    stalled = await RawH2.connect(server.address)
    try:
        stalled.headers(f"{SERVICE}/Ping")  # and never a message
        await stalled.flush()
        await silent.until_closed(timeout=20)
        await stalled.until_closed(timeout=20)
    finally:
        await silent.close()
        await stalled.close()
    assert stalled.goaway is not None
    assert stalled.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_waiting_calls_are_capped(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpcio", server.address)

    async def wait_lease() -> str:
        try:
            await client.lease("empty", reservation_id=str(uuid.uuid4()), wait="20s", timeout=30)
        except RpcError as err:
            return err.code
        return "OK"

    calls = [asyncio.create_task(wait_lease()) for _ in range(5)]
    # Two past the cap of 3 answer at once, as if they had asked no wait...
    done = await eventually(
        lambda: asyncio.sleep(0, [c for c in calls if c.done()]),
        lambda d: len(d) >= 2,
        15,
        "the calls over max_waiting_calls answered",
    )
    assert [c.result() for c in done] == ["RESOURCE_EXHAUSTED"] * 2
    # ... while three wait.
    await asyncio.sleep(0.5)
    assert sum(not c.done() for c in calls) == 3
    for c in calls:
        c.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


async def test_ping_answers_while_every_pool_connection_is_busy(
    server: Running, client_factory: Callable[[str, str], Client], grpcio_modules: GrpcioModules
) -> None:
    import asyncpg

    client = client_factory("grpcio", server.address)
    lock = await asyncpg.connect(server.db_url)
    tx = lock.transaction()
    await tx.start()
    # Each GetLease reads leases: each takes a pool connection and waits.
    await lock.execute("LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
    blocked = [asyncio.create_task(client.get_lease(f"vmp-nobody-{i}")) for i in range(30)]
    try:

        async def waiting_on_lock() -> int:
            rows = await server.sql(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND application_name = 'vmpool'"
            )
            return int(rows[0]["n"])

        # Every connection of the server's pool (10) waits behind the lock.
        await eventually(waiting_on_lock, lambda n: n >= 10, 15, "the pool busy")
        assert await _ping(server, grpcio_modules) == "pong"
    finally:
        await tx.rollback()
        await lock.close()
        await asyncio.gather(*blocked, return_exceptions=True)


async def test_sigterm_sends_goaway_and_calls_in_flight_finish(
    start_server: Callable[..., Awaitable[Running]],
    grpcio_modules: GrpcioModules,
) -> None:
    running = await start_server(POOLS, name="goaway", shutdown_grace="10s")
    raw = await RawH2.connect(running.address)
    mods = grpcio_modules
    channel = grpc.aio.insecure_channel(running.address)
    try:
        # A waiting Lease in flight on the raw connection, one on grpcio.
        request = mods.pb2.LeaseRequest(
            pool="empty", service_tag="t", reservation_id=str(uuid.uuid4())
        ).SerializeToString()
        sid = raw.headers(f"{SERVICE}/Lease", [("x-vmpool-wait", "20s")])
        raw.data(sid, frame(request))
        await raw.flush()
        lease = _lease_call(channel, mods)
        in_flight = asyncio.ensure_future(
            lease(
                mods.pb2.LeaseRequest(
                    pool="empty", service_tag="t", reservation_id=str(uuid.uuid4())
                ),
                metadata=(("x-vmpool-wait", "20s"),),
                timeout=30,
            )
        )
        rows = await eventually(
            lambda: running.sql("SELECT count(*) AS n FROM reservations"),
            lambda r: r[0]["n"] == 2,
            10,
            "both reservations queued",
        )
        assert rows
        assert running.proc.proc is not None
        running.proc.proc.send_signal(signal.SIGTERM)
        while raw.goaway is None and not raw.closed:
            await raw.receive(timeout=10)
        assert raw.goaway is not None
        assert raw.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        assert raw.goaway.last_stream_id == sid
        # The call in flight on grpcio is answered (its queue place), not cut.
        err = await _rpc_error(in_flight)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "queued at position" in (err.details() or "")
        status = await asyncio.to_thread(running.proc.proc.wait, 20)
        assert status == 0
    finally:
        await raw.close()
        await channel.close()
    running.assert_clean_log()
