"""WatchLeases through grpcio (an independent stack compiled from api/): server
streaming, every event once and in order, resume from a cursor on another
replica after one is killed, cancellation, deadlines, bad cursors, shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.e2e.clients import Client
from tests.e2e.conftest import Running, lease_when_free
from tests.e2e.grpcio_stack import GrpcioModules, compile_admin_api
from tests.e2e.identity_kit import Issuer, Pki, TlsClient
from vmpool.store.events import PRUNE

POOLS = [{"name": "w", "min_ready": 3, "max_size": 6, "default_lease": "10m"}]


@pytest.fixture(scope="module")
def admin_pb() -> tuple[ModuleType, ModuleType]:
    return compile_admin_api()


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[Running]]) -> Running:
    running = await start_server(POOLS)
    await running.wait_ready("w", 3)
    return running


class Watcher:
    """One WatchLeases call; events are collected as they arrive."""

    def __init__(
        self,
        address: str,
        pb: tuple[ModuleType, ModuleType],
        channel: grpc.aio.Channel | None = None,
        **request: Any,
    ) -> None:
        pb2, pb2_grpc = pb
        self.pb2 = pb2
        # A connection of its own (grpcio shares one between channels otherwise).
        self.channel = channel or grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        stub = pb2_grpc.VMPoolExtensionServiceStub(self.channel)
        timeout = request.pop("timeout", None)
        self.call = stub.WatchLeases(pb2.WatchLeasesRequest(**request), timeout=timeout)
        self.events: list[Any] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.call:
                self.events.append(event)
        except grpc.aio.AioRpcError as err:
            self.error = err
        except asyncio.CancelledError:
            pass

    def named(self, *types: str) -> list[Any]:
        wanted = {self.pb2.LeaseEventType.Value(t) for t in types}
        return [e for e in self.events if e.type in wanted]

    async def wait_for(self, pred: Callable[[list[Any]], bool], timeout: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred(self.events):
            if self.task.done() or asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not seen in time: {self.events} error={self.error}")
            await asyncio.sleep(0.02)

    async def started(self) -> None:
        """The first message (a HEARTBEAT with the starting cursor): the stream is open."""
        await self.wait_for(lambda ev: len(ev) >= 1)

    async def close(self) -> None:
        self.call.cancel()
        await self.task
        await self.channel.close()


@pytest.fixture
async def watchers(
    admin_pb: tuple[ModuleType, ModuleType],
) -> AsyncIterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(address: str, **request: Any) -> Watcher:
        w = Watcher(address, admin_pb, **request)
        made.append(w)
        return w

    yield make
    for w in made:
        await w.close()


def kind(pb2: ModuleType, event: Any) -> str:
    return str(pb2.LeaseEventType.Name(event.type))


def lease_events(w: Watcher) -> list[tuple[str, str]]:
    skip = {"HEARTBEAT", "SNAPSHOT_END", "SNAPSHOT_LEASE", "SNAPSHOT_RESERVATION", "EXPIRING"}
    return [(kind(w.pb2, e), e.instance) for e in w.events if kind(w.pb2, e) not in skip]


async def test_watch_sees_lease_extend_return_in_order_and_resumes_after_a_cursor(
    server: Running, client_factory: Callable[[str, str], Client], watchers: Callable[..., Watcher]
) -> None:
    w = watchers(server.address, snapshot=True, pool="w")
    await w.wait_for(lambda ev: any(kind(w.pb2, e) == "SNAPSHOT_END" for e in ev))
    c = client_factory("grpclib", server.address)
    lease = await lease_when_free(c, "w", service_tag="e2e")
    later = datetime.now(UTC) + timedelta(minutes=20)
    await c.extend_to(lease.instance, later, service_tag="e2e")
    await c.return_(lease.instance, service_tag="e2e")
    await w.wait_for(lambda _ev: ("RETURNED", lease.instance) in lease_events(w))
    got = [x for x in lease_events(w) if x[1] == lease.instance]
    assert got == [
        ("LEASED", lease.instance),
        ("EXTENDED", lease.instance),
        ("RETURNED", lease.instance),
    ]
    leased = next(e for e in w.events if kind(w.pb2, e) == "LEASED")
    assert leased.service_tag == "e2e" and leased.principal == "anonymous"
    assert leased.expires.seconds == int(lease.expires.timestamp())
    # Resume after the LEASED event: the rest, once, in order.
    again = watchers(server.address, after=leased.cursor)
    await again.wait_for(lambda _ev: ("RETURNED", lease.instance) in lease_events(again))
    assert [x for x in lease_events(again) if x[1] == lease.instance] == [
        ("EXTENDED", lease.instance),
        ("RETURNED", lease.instance),
    ]
    cursors = [e.cursor for e in w.events]
    assert len(set(cursors)) == len(cursors) or "HEARTBEAT" in {kind(w.pb2, e) for e in w.events}


async def test_a_lease_client_sees_only_its_own_tag(
    server: Running, client_factory: Callable[[str, str], Client], watchers: Callable[..., Watcher]
) -> None:
    mine = watchers(server.address, service_tag="mine", expiring_lead_seconds=-1)
    theirs = watchers(server.address, service_tag="theirs", expiring_lead_seconds=-1)
    await mine.started()
    await theirs.started()
    c = client_factory("grpcio", server.address)
    lease = await lease_when_free(c, "w", service_tag="mine")
    await c.return_(lease.instance, service_tag="mine")
    await mine.wait_for(lambda _ev: ("RETURNED", lease.instance) in lease_events(mine))
    assert all(e.service_tag == "mine" for e in mine.events if e.instance)
    assert lease_events(theirs) == []


async def test_a_bad_cursor_is_invalid_argument_naming_after(
    server: Running, watchers: Callable[..., Watcher]
) -> None:
    w = watchers(server.address, after="not a cursor!")
    await w.task
    assert w.error is not None
    assert w.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert w.error.details().startswith("after:")


@pytest.mark.parametrize(
    ("field", "limit"), [("pool", 128), ("instance", 253), ("principal", 1024)]
)
async def test_a_filter_longer_than_any_name_is_invalid_argument_naming_it(
    server: Running, watchers: Callable[..., Watcher], field: str, limit: int
) -> None:
    w = watchers(server.address, **{field: "x" * 5000})
    await w.task
    assert w.error is not None
    assert w.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert w.error.details() == f"{field}: longer than {limit} characters (5000)"
    ok = watchers(server.address, **{field: "x" * limit})  # as long as allowed: no match, no error
    await ok.started()


async def test_a_deadline_ends_the_stream_and_the_server_keeps_serving(
    server: Running, client_factory: Callable[[str, str], Client], watchers: Callable[..., Watcher]
) -> None:
    w = watchers(server.address, timeout=0.5)
    await w.task
    assert w.error is not None and w.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    c = client_factory("grpclib", server.address)
    assert await c.ping() == "pong"


async def test_resume_on_another_replica_after_one_is_killed_gets_every_event_once(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
    watchers: Callable[..., Watcher],
) -> None:
    a = await start_server(POOLS, name="a")
    b = await start_server(POOLS, db_url=a.db_url, name="b")
    await a.wait_ready("w", 3)
    w = watchers(a.address, expiring_lead_seconds=-1)
    await w.started()
    ca = client_factory("grpclib", b.address)
    first = await lease_when_free(ca, "w", service_tag="k")
    await w.wait_for(lambda _ev: ("LEASED", first.instance) in lease_events(w))
    a.proc.kill()
    await w.task
    assert w.error is not None and w.error.code() == grpc.StatusCode.UNAVAILABLE
    last = w.events[-1].cursor
    await ca.return_(first.instance, service_tag="k")
    second = await lease_when_free(ca, "w", service_tag="k", timeout=20)
    resumed = watchers(b.address, after=last, expiring_lead_seconds=-1)
    await resumed.wait_for(lambda _ev: ("LEASED", second.instance) in lease_events(resumed))
    assert lease_events(resumed) == [("RETURNED", first.instance), ("LEASED", second.instance)]


async def test_sigterm_ends_streams_with_unavailable_and_a_cursor(
    start_server: Callable[..., Awaitable[Running]], watchers: Callable[..., Watcher]
) -> None:
    s = await start_server(POOLS, name="stopping")
    w = watchers(s.address)
    await w.started()
    s.proc.proc.send_signal(signal.SIGTERM)
    await w.task
    assert w.error is not None and w.error.code() == grpc.StatusCode.UNAVAILABLE
    assert 'resume with after="' in w.error.details()


async def _cli_watch(address: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmpool",
        "watch",
        "--output",
        "json",
        "--server",
        address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _next_json(proc: asyncio.subprocess.Process, timeout: float = 15) -> dict[str, Any]:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert raw, "vmpool watch ended"
    out: dict[str, Any] = json.loads(raw)
    return out


async def _open(proc: asyncio.subprocess.Process) -> None:
    """Until the snapshot has ended: the stream is open, later events will show."""
    while (await _next_json(proc, 30))["type"] != "SNAPSHOT_END":
        pass


async def test_cli_watch_prints_json_lines_and_ctrl_c_exits_130_quietly(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    proc = await _cli_watch(server.address, "--pool", "w", "--expiring-lead", "off", "--snapshot")
    try:
        await _open(proc)
        c = client_factory("grpclib", server.address)
        lease = await lease_when_free(c, "w", service_tag="cli")
        await c.return_(lease.instance, service_tag="cli")
        got = [await _next_json(proc), await _next_json(proc)]
        assert [(e["type"], e["instance"]) for e in got] == [
            ("LEASED", lease.instance),
            ("RETURNED", lease.instance),
        ]
        assert got[0]["service_tag"] == "cli" and got[0]["cursor"]
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    assert err.decode() == ""


async def test_cli_watch_resumes_when_the_server_comes_back(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
) -> None:
    first = await start_server(POOLS, name="cli-first")
    await first.wait_ready("w", 3)
    proc = await _cli_watch(first.address, "--expiring-lead", "off", "--snapshot")
    try:
        await _open(proc)
        c = client_factory("grpclib", first.address)
        one = await lease_when_free(c, "w", service_tag="r")
        assert (await _next_json(proc))["instance"] == one.instance
        assert first.proc.terminate() == 0
        port = int(first.address.rsplit(":", 1)[1])
        second = await start_server(POOLS, db_url=first.db_url, name="cli-second", port=port)
        c2 = client_factory("grpclib", second.address)
        await c2.return_(one.instance, service_tag="r")
        got = await _next_json(proc, 30)
        assert (got["type"], got["instance"]) == ("RETURNED", one.instance)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "resuming" in err.decode()


async def test_a_slow_reader_is_ended_with_a_cursor_and_resuming_from_it_loses_nothing(
    start_server: Callable[..., Awaitable[Running]],
    admin_pb: tuple[ModuleType, ModuleType],
    watchers: Callable[..., Watcher],
) -> None:
    s = await start_server(POOLS, name="slow", limits={"watch_buffer": 10})
    pb2, pb2_grpc = admin_pb
    channel = grpc.aio.insecure_channel(s.address, options=[("grpc.http2.bdp_probe", 0)])
    try:
        stub = pb2_grpc.VMPoolExtensionServiceStub(channel)
        call = stub.WatchLeases(pb2.WatchLeasesRequest(snapshot=True, expiring_lead_seconds=-1))
        while (end := await call.read()).type != pb2.LeaseEventType.Value("SNAPSHOT_END"):
            pass
        # A reader that keeps up, to tell when the server has fetched every event.
        fast = watchers(s.address, expiring_lead_seconds=-1, instance="")
        await fast.started()
        # 2,000 leases in one statement: far more than the HTTP/2 window (64 KiB)
        # and the stream's buffer hold while this reader does not read.
        n = 2000
        await s.sql(
            """WITH i AS (
                   INSERT INTO instances (name, pool, state, created_at, state_changed_at)
                   SELECT 'slow-' || g, 'w', 'leased', now(), now()
                   FROM generate_series(1, $1) g RETURNING name)
               INSERT INTO leases (instance, pool, service_tag, leased_at, expires_at)
               SELECT name, 'w', 'slow', now(), now() + interval '1 day' FROM i""",
            n,
        )
        # Every event offered to every stream (was: a 3 s sleep, which a loaded
        # machine's event reader could outlast; reading then kept the stream up).
        # The server offers each fetch (1,000 events) to all streams at once, so a
        # fast reader that a loaded machine left behind at the second fetch tells
        # the same.
        await fast.wait_for(
            lambda _ev: len(lease_events(fast)) >= n or fast.error is not None, timeout=60
        )
        assert fast.error is None or "fell" in (fast.error.details() or ""), fast.error
        first: list[Any] = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (event := await call.read()) is not grpc.aio.EOF:
                first.append(event)
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = ended.value.details()
        assert "fell 10 events behind" in message
        cursor = message.split('after="', 1)[1].split('"', 1)[0]
        assert cursor and end.cursor
    finally:
        await channel.close()
    rest = watchers(s.address, after=cursor, expiring_lead_seconds=-1, instance="")
    await rest.wait_for(lambda _ev: len(lease_events(rest)) >= n - len(first), timeout=60)
    names = [e.instance for e in first] + [e.instance for e in rest.events if e.instance]
    assert sorted(names) == sorted(f"slow-{g}" for g in range(1, n + 1))
    assert len(names) == len(set(names)) == n


async def test_stream_caps_per_process_and_per_connection(
    start_server: Callable[..., Awaitable[Running]],
    watchers: Callable[..., Watcher],
    admin_pb: tuple[ModuleType, ModuleType],
) -> None:
    s = await start_server(
        POOLS,
        name="caps",
        limits={"max_watch_streams": 3, "max_watch_streams_per_connection": 2},
    )
    pb2, pb2_grpc = admin_pb
    channel = grpc.aio.insecure_channel(s.address)
    try:
        stub = pb2_grpc.VMPoolExtensionServiceStub(channel)
        calls = [stub.WatchLeases(pb2.WatchLeasesRequest()) for _ in range(3)]
        firsts = await asyncio.gather(*(c.read() for c in calls), return_exceptions=True)
        refused = [x for x in firsts if isinstance(x, grpc.aio.AioRpcError)]
        assert len(refused) == 1, firsts  # which one lost the race does not matter
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_watch_streams_per_connection" in refused[0].details()
        opened = [c for c, x in zip(calls, firsts, strict=True) if x is not refused[0]]
        other = watchers(s.address)  # another connection: the third of the process
        await other.started()
        fourth = watchers(s.address)
        await fourth.task
        assert fourth.error is not None
        assert fourth.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_watch_streams)" in fourth.error.details()
        opened[0].cancel()
        again = watchers(s.address)  # a stream ended: room again
        await again.started()
    finally:
        await channel.close()


async def test_a_cursor_older_than_the_retention_is_out_of_range_naming_the_oldest(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
    watchers: Callable[..., Watcher],
) -> None:
    s = await start_server(POOLS, name="retention")
    await s.wait_ready("w", 3)
    w = watchers(s.address, expiring_lead_seconds=-1)
    await w.started()
    c = client_factory("grpclib", s.address)
    lease = await lease_when_free(c, "w", service_tag="old")
    await c.return_(lease.instance, service_tag="old")
    await w.wait_for(lambda _ev: ("RETURNED", lease.instance) in lease_events(w))
    start = w.events[0].cursor  # the first HEARTBEAT: before the LEASED event
    # What the leader's retention run does once events are older than it: here
    # the oldest one (LEASED) goes.
    await s.sql(PRUNE, -1.0, 1)
    late = watchers(s.address, after=start)
    await late.task
    assert late.error is not None
    assert late.error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "the oldest available is" in late.error.details()
    oldest = late.error.details().split('the oldest available is "', 1)[1].split('"', 1)[0]
    resumed = watchers(s.address, after=oldest, expiring_lead_seconds=-1)
    await resumed.wait_for(lambda _ev: ("RETURNED", lease.instance) in lease_events(resumed))


async def test_the_snapshot_shows_current_leases_then_what_follows(
    server: Running, client_factory: Callable[[str, str], Client], watchers: Callable[..., Watcher]
) -> None:
    c = client_factory("grpclib", server.address)
    held = await lease_when_free(c, "w", service_tag="snap")
    try:
        w = watchers(server.address, snapshot=True, service_tag="snap")
        await w.wait_for(lambda ev: any(kind(w.pb2, e) == "SNAPSHOT_END" for e in ev))
        snap = [e for e in w.events if kind(w.pb2, e) == "SNAPSHOT_LEASE"]
        assert [e.instance for e in snap] == [held.instance]
        assert snap[0].expires.seconds == int(held.expires.timestamp())
    finally:
        await c.return_(held.instance, service_tag="snap")
    await w.wait_for(lambda _ev: ("RETURNED", held.instance) in lease_events(w))
    assert ("LEASED", held.instance) not in lease_events(w)  # the snapshot had it


async def test_with_authentication_a_lease_client_sees_only_its_own_leases(
    start_server: Callable[..., Awaitable[Running]],
    grpcio_modules: GrpcioModules,
    admin_pb: tuple[ModuleType, ModuleType],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """jwt over TLS: alice's and bob's streams show their own leases only (even
    with the same tag); a filter on another's principal shows nothing; an admin
    sees both."""
    pki = Pki(tmp_path_factory.mktemp("watch-pki"))
    issuer = Issuer()
    jwks = pki.root / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    cert = pki.server()
    s = await start_server(
        POOLS,
        name="watch-jwt",
        tls={"cert_file": str(cert.cert), "key_file": str(cert.key)},
        auth={
            "mode": "jwt",
            "jwt": {"issuer": issuer.url, "jwks_file": str(jwks)},
            "policy": [{"subject": "group:vmpool-admins", "roles": ["admin"]}],
        },
    )
    await s.wait_ready("w", 3)
    pb2, pb2_grpc = admin_pb
    opened: list[Any] = []

    def watch(token: str, **request: Any) -> Any:
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(pki.ca.read_bytes()),
            grpc.access_token_call_credentials(token),
        )
        channel = grpc.aio.secure_channel(s.address, creds)
        opened.append(channel)
        stub = pb2_grpc.VMPoolExtensionServiceStub(channel)
        return stub.WatchLeases(pb2.WatchLeasesRequest(expiring_lead_seconds=-1, **request))

    async def until_returned(call: Any, instance: str) -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        while (kind(pb2, e := await call.read()), e.instance) != ("RETURNED", instance):
            if e.instance:
                seen.append((kind(pb2, e), e.instance))
        return seen

    try:
        alice_w = watch(issuer.token("alice"))
        bob_w = watch(issuer.token("bob"))
        nosy = watch(issuer.token("bob"), principal="alice")
        admin_w = watch(issuer.token("carol", groups=("vmpool-admins",)))
        for call in (alice_w, bob_w, nosy, admin_w):
            assert kind(pb2, await call.read()) == "HEARTBEAT"
        alice = TlsClient(s.address, grpcio_modules, pki.ca, token=issuer.token("alice"))
        bob = TlsClient(s.address, grpcio_modules, pki.ca, token=issuer.token("bob"))
        try:
            a = await lease_when_free(alice, "w", service_tag="ci")
            b = await lease_when_free(bob, "w", service_tag="ci")
            await alice.return_(a.instance, "ci")
            await bob.return_(b.instance, "ci")
        finally:
            await alice.close()
            await bob.close()
        assert await until_returned(alice_w, a.instance) == [("LEASED", a.instance)]
        assert await until_returned(bob_w, b.instance) == [("LEASED", b.instance)]
        admin_seen = await until_returned(admin_w, b.instance)
        assert ("LEASED", a.instance) in admin_seen and ("RETURNED", a.instance) in admin_seen
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(nosy.read(), 1.0)  # alice's events never reach bob
    finally:
        for channel in opened:
            await channel.close()
