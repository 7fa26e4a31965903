"""WatchLeases checked from outside (issue 20, "Checked by"): a grpcio client of
its own, compiled from api/, against real `vmpool serve` processes. It watches
while it leases, extends, returns, lets a lease expire and has one stopped by an
operator; resumes on another replica; and sends cursors no server gave out."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from tests.e2e.conftest import Running
from tests.e2e.grpcio_stack import compile_admin_api, compile_proto
from tests.e2e.identity_kit import Issued, Pki
from tests.e2e.test_cli_wait import cli_running
from tests.e2e.test_watch import Watcher

POOLS = [{"name": "q", "min_ready": 3, "max_size": 6, "default_lease": "10m"}]
StartServer = Callable[..., Awaitable[Running]]


class Api:
    """The three services this check needs, compiled by grpc_tools from api/."""

    def __init__(self, out: Path) -> None:
        self.adm, self.adm_grpc = compile_admin_api()
        self.lease, self.lease_grpc = compile_proto(
            out / "lease", "intrinsic_proto/vmpoolleaseapi/v1/vmpoolleaseapi.proto"
        )
        self.pool, self.pool_grpc = compile_proto(
            out / "pool", "intrinsic_proto/vmpoolapi/v1/vmpool_api.proto"
        )

    def name(self, event: Any) -> str:
        return str(self.adm.LeaseEventType.Name(event.type))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Api:
    return Api(tmp_path_factory.mktemp("qacheck"))


def channel(address: str, tls: tuple[Path, Issued] | None = None) -> grpc.aio.Channel:
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    ca, who = tls
    key, chain = who.pair()
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key, chain)
    return grpc.aio.secure_channel(address, creds, options=options)


class Stream(Watcher):
    """One WatchLeases call (on a channel of its own), read as fast as it comes."""

    def __init__(self, api: Api, ch: grpc.aio.Channel, **request: Any) -> None:
        super().__init__("", (api.adm, api.adm_grpc), ch, **request)
        self.api = api

    def changes(self) -> list[Any]:
        """The stored events (no heartbeats, snapshot rows or derived EXPIRING)."""
        derived = {"HEARTBEAT", "EXPIRING", "SNAPSHOT_LEASE", "SNAPSHOT_RESERVATION"}
        return [e for e in self.events if self.api.name(e) not in derived | {"SNAPSHOT_END"}]

    def seen(self, kind: str, instance: str) -> bool:
        return any(self.api.name(e) == kind and e.instance == instance for e in self.events)

    async def until(self, pred: Callable[[], bool], timeout: float = 15) -> None:
        await self.wait_for(lambda _ev: pred(), timeout)

    async def opened(self) -> None:
        await self.started()

    async def ended(self) -> grpc.aio.AioRpcError:
        await asyncio.wait_for(self.task, 15)
        assert self.error is not None, self.events
        return self.error


@pytest.fixture
async def open_stream(api: Api) -> AsyncIterator[Callable[..., Stream]]:
    made: list[Stream] = []

    def make(address: str, tls: tuple[Path, Issued] | None = None, **request: Any) -> Stream:
        made.append(Stream(api, channel(address, tls), **request))
        return made[-1]

    yield make
    for s in made:
        await s.close()


def ts(api: Api, at: datetime, nanos: int | None = None) -> Any:
    out = api.lease.google_dot_protobuf_dot_timestamp__pb2.Timestamp()
    out.seconds = int(at.timestamp())
    out.nanos = at.microsecond * 1000 if nanos is None else nanos
    return out


class Leaser:
    """Lease API and VMPoolService calls through grpcio."""

    def __init__(self, api: Api, ch: grpc.aio.Channel) -> None:
        self.api = api
        self.ch = ch
        self.leases = api.lease_grpc.VMPoolLeaseServiceStub(ch)
        self.pools = api.pool_grpc.VMPoolServiceStub(ch)

    async def lease(self, tag: str, ttl: timedelta | None = None, timeout: float = 15) -> Any:
        """Lease from pool q (for ``ttl``), retrying while it refills."""
        deadline = time.monotonic() + timeout
        while True:
            req = self.api.lease.LeaseRequest(pool="q", service_tag=tag)
            if ttl is not None:
                req.expires.CopyFrom(ts(self.api, datetime.now(UTC) + ttl))
            try:
                return (await self.leases.Lease(req, timeout=5)).lease
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)

    async def extend(self, instance: str, tag: str, to: Any) -> Any:
        req = self.api.lease.ExtendToRequest(instance=instance, service_tag=tag, to=to)
        return (await self.leases.ExtendTo(req, timeout=5)).lease

    async def return_(self, instance: str, tag: str) -> None:
        req = self.api.lease.ReturnRequest(instance=instance, service_tag=tag)
        await self.leases.Return(req, timeout=5)

    async def stop(self, instance: str) -> None:
        await self.pools.StopLease(self.api.pool.StopLeaseRequest(lease_name=instance), timeout=5)


@pytest.fixture
async def leaser(api: Api) -> AsyncIterator[Callable[..., Leaser]]:
    made: list[grpc.aio.Channel] = []

    def make(address: str, tls: tuple[Path, Issued] | None = None) -> Leaser:
        ch = channel(address, tls)
        made.append(ch)
        return Leaser(api, ch)

    yield make
    for ch in made:
        await ch.close()


def ns(t: Any) -> int:
    return int(t.seconds) * 1_000_000_000 + int(t.nanos)


# --- one stream, every kind of ending ------------------------------------------


async def test_every_change_of_a_lease_is_seen_once_with_who_caused_it(
    start_server: StartServer,
    api: Api,
    open_stream: Callable[..., Stream],
    leaser: Callable[..., Leaser],
) -> None:
    s = await start_server(POOLS, name="qa-one")
    await s.wait_ready("q", 3)
    w = open_stream(s.address, pool="q", expiring_lead_seconds=60)
    await w.opened()
    c = leaser(s.address)
    a = await c.lease("qa")
    later = ts(api, datetime.now(UTC) + timedelta(minutes=20), 123_456_789)
    extended = await c.extend(a.instance, "qa", later)
    await c.return_(a.instance, "qa")
    b = await c.lease("qa", ttl=timedelta(seconds=1))
    d = await c.lease("qa")
    await c.stop(d.instance)
    await w.until(lambda: w.seen("EXPIRED", b.instance) and w.seen("STOPPED", d.instance))

    got = [(api.name(e), e.instance) for e in w.events if e.instance]
    assert [x for x in got if x[1] == a.instance] == [
        ("LEASED", a.instance),
        ("EXTENDED", a.instance),
        ("RETURNED", a.instance),
    ]
    assert [x for x in got if x[1] == b.instance] == [
        ("LEASED", b.instance),
        ("EXPIRING", b.instance),
        ("EXPIRED", b.instance),
    ]
    assert [x for x in got if x[1] == d.instance] == [
        ("LEASED", d.instance),
        ("STOPPED", d.instance),
    ]
    by = {(api.name(e), e.instance): e for e in w.events}
    assert ns(by["EXTENDED", a.instance].expires) == ns(extended.expires) == ns(later)
    assert by["EXPIRED", b.instance].principal == "vmpool:reconciler"
    assert by["EXPIRING", b.instance].principal == "vmpool:reconciler"  # docs/api.md
    assert by["STOPPED", d.instance].reason == "StopLease"
    for e in w.changes():
        assert (e.pool, e.service_tag) == ("q", "qa"), e
        assert e.cursor and e.time.seconds > 0
    cursors = [e.cursor for e in w.changes()]
    assert len(set(cursors)) == len(cursors)

    # Resuming after any of these events gives exactly the ones after it.
    changes = [(api.name(e), e.instance) for e in w.changes()]
    for k in (0, 2, len(changes) - 2):
        again = open_stream(s.address, pool="q", expiring_lead_seconds=-1, after=cursors[k])
        await again.opened()  # the replayed events follow its first message
        want = len(changes) - k - 1
        await again.until(lambda a=again, n=want: len(a.changes()) >= n)
        assert [(api.name(e), e.instance) for e in again.changes()] == changes[k + 1 :]


# --- cursors no server gave out -----------------------------------------------


def _cursor(*fields: int, fmt: str = ">BQQ") -> str:
    return base64.urlsafe_b64encode(struct.pack(fmt, *fields)).rstrip(b"=").decode()


BAD_CURSORS = {
    "text": "not a cursor!",
    "long": "A" * 5000,
    "short": _cursor(1, 5, fmt=">BQ"),
    "version": _cursor(9, 1, 1),
    "plain with a tail": _cursor(1, 1, 1) + "AAAA",
    "beyond the database": _cursor(1, 2**64 - 1, 0),
    "pos beyond int8": _cursor(1, 2**63, 0),
    "snapshot too many xids": _cursor(2, 1, 0, 1, 2, 65, fmt=">BQQQQH"),
}


async def test_a_cursor_no_server_gave_out_is_invalid_argument_naming_after(
    start_server: StartServer, open_stream: Callable[..., Stream]
) -> None:
    s = await start_server(POOLS, name="qa-bad")
    for name, cursor in BAD_CURSORS.items():
        err = await open_stream(s.address, after=cursor).ended()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
        assert (err.details() or "").startswith("after:"), (name, err.details())
        assert len(err.details() or "") < 200  # the client's value is not echoed


async def test_a_seq_beyond_int8_in_an_old_position_is_invalid_argument_not_internal(
    start_server: StartServer, open_stream: Callable[..., Stream]
) -> None:
    """Position 1 is before anything this database wrote (nothing pruned yet), so
    the stream would read from the database with the cursor's seq."""
    s = await start_server(POOLS, name="qa-seq")
    for seq in (2**63, 2**64 - 1):
        err = await open_stream(s.address, after=_cursor(1, 1, seq)).ended()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (seq, err)
        assert (err.details() or "").startswith("after:")
    ok = open_stream(s.address, after=_cursor(1, 1, 2**63 - 1))
    await ok.opened()  # the largest seq a position can have is a cursor
    assert ok.api.name(ok.events[0]) == "HEARTBEAT"
    s.assert_clean_log()


# --- two replicas on one database -------------------------------------------


async def _churn(s: Running, stop: asyncio.Event, leaser: Leaser) -> None:
    """Lease and return, and leases left to expire, until ``stop``."""
    n = 0
    while not stop.is_set():
        n += 1
        short = n % 4 == 0
        ttl = timedelta(milliseconds=500) if short else None
        lease = await leaser.lease(f"load-{n % 3}", ttl=ttl)
        if not short:
            await leaser.return_(lease.instance, f"load-{n % 3}")


def _key(api: Api, events: list[Any]) -> list[tuple[str, str, str]]:
    return [(api.name(e), e.instance, e.cursor) for e in events]


async def test_a_stream_resumed_on_the_other_replica_after_a_kill_misses_nothing(
    start_server: StartServer,
    api: Api,
    open_stream: Callable[..., Stream],
    leaser: Callable[..., Leaser],
) -> None:
    a = await start_server(POOLS, name="qa-a")
    b = await start_server(POOLS, db_url=a.db_url, name="qa-b")
    await a.wait_ready("q", 3)
    reference = open_stream(b.address, expiring_lead_seconds=-1)
    watched = open_stream(a.address, expiring_lead_seconds=-1)
    await reference.opened()
    await watched.opened()
    stop = asyncio.Event()
    load = asyncio.create_task(_churn(b, stop, leaser(b.address)))
    try:
        await watched.until(lambda: len(watched.changes()) >= 12)
        a.proc.kill()
        assert (await watched.ended()).code() == grpc.StatusCode.UNAVAILABLE
        # At once, from the last cursor it received: the other replica may not
        # have looked at the database since that cursor was given out.
        resumed = open_stream(b.address, after=watched.events[-1].cursor, expiring_lead_seconds=-1)
        await resumed.opened()
        await asyncio.sleep(2)
    finally:
        stop.set()
        await load
    last = reference.changes()[-1].cursor
    await resumed.until(lambda: any(e.cursor == last for e in resumed.events))
    both = _key(api, watched.changes()) + _key(api, resumed.changes())
    assert both == _key(api, reference.changes())
    assert {k for k, _, _ in both} >= {"LEASED", "RETURNED", "EXPIRED"}


async def test_a_cursor_just_given_out_by_one_replica_is_accepted_by_the_other(
    start_server: StartServer, open_stream: Callable[..., Stream]
) -> None:
    """Transactions keep starting (as the reconcilers' do); the other replica's
    reader may have last looked before the cursor's position existed."""
    a = await start_server(POOLS, name="qa-c")
    b = await start_server(POOLS, db_url=a.db_url, name="qa-d")
    stop = asyncio.Event()

    async def xids() -> None:
        conn = await asyncpg.connect(a.db_url)
        try:
            while not stop.is_set():
                await conn.execute("SELECT pg_current_xact_id()")
        finally:
            await conn.close()

    async def fresh_cursor() -> str:
        """A cursor from replica a just after its reader looked again (its tail
        moved): the other reader last looked up to a second ago."""
        first = open_stream(a.address)
        await first.opened()
        while True:
            await asyncio.sleep(0.03)
            w = open_stream(a.address)
            await w.opened()
            if w.events[0].cursor != first.events[0].cursor:
                return str(w.events[0].cursor)
            await w.close()

    churn = asyncio.create_task(xids())
    try:
        for _ in range(5):
            other = open_stream(b.address, after=await fresh_cursor())
            await other.opened()
    finally:
        stop.set()
        await churn


# --- identity: what a lease client may see --------------------------------------


async def test_under_mtls_another_principal_sees_none_of_the_first_ones_events(
    start_server: StartServer,
    api: Api,
    open_stream: Callable[..., Stream],
    leaser: Callable[..., Leaser],
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki")
    server = pki.server()
    s = await start_server(
        POOLS,
        name="qa-mtls",
        tls={
            "cert_file": str(server.cert),
            "key_file": str(server.key),
            "client_ca_file": str(pki.ca),
            "require_client_cert": True,
        },
        auth={
            "mode": "mtls",
            "policy": [
                {"subject": "ops", "roles": ["admin"]},
                {"subject": "spiffe://test/*", "roles": ["lease"], "service_tags": ["team-*"]},
            ],
        },
    )
    await s.wait_ready("q", 3)
    alice = (pki.ca, pki.issue("alice", cn="alice", uris=("spiffe://test/alice",)))
    bob = (pki.ca, pki.issue("bob", cn="bob", uris=("spiffe://test/bob",)))
    ops = (pki.ca, pki.issue("ops", cn="ops"))
    held = await leaser(s.address, alice).lease("team-a")  # before the streams: snapshot
    hers = open_stream(s.address, alice, expiring_lead_seconds=-1)
    admin = open_stream(s.address, ops, principal="spiffe://test/alice", expiring_lead_seconds=-1)
    filters: list[dict[str, Any]] = [
        {},
        {"service_tag": "team-a"},
        {"pool": "q"},
        {"instance": held.instance},
        {"principal": "spiffe://test/alice"},
        {"snapshot": True},
        {"snapshot": True, "service_tag": "team-a", "pool": "q"},
    ]
    his = [open_stream(s.address, bob, expiring_lead_seconds=60, **f) for f in filters]
    for w in [hers, admin, *his]:
        await w.opened()
    c, operator = leaser(s.address, alice), leaser(s.address, ops)
    lease = await c.lease("team-a")
    await c.extend(lease.instance, "team-a", ts(api, datetime.now(UTC) + timedelta(minutes=30)))
    await c.return_(lease.instance, "team-a")
    await operator.stop(held.instance)
    short = await c.lease("team-b", ttl=timedelta(seconds=1))
    for w in (hers, admin):
        await w.until(lambda w=w: w.seen("STOPPED", held.instance))  # type: ignore[misc]
        await w.until(lambda w=w: w.seen("EXPIRED", short.instance))  # type: ignore[misc]
        assert len(w.changes()) == 6, w.changes()
    stopped = next(e for e in hers.events if api.name(e) == "STOPPED")
    assert (stopped.principal, stopped.owner_principal) == ("ops", "spiffe://test/alice")
    for f, w in zip(filters, his, strict=True):
        assert [e for e in w.events if e.instance] == [], f
        assert not w.task.done(), (f, w.error)  # nothing, and no error either


# --- a slow consumer --------------------------------------------------------------


async def test_a_slow_consumer_is_ended_naming_where_to_resume_and_loses_nothing(
    start_server: StartServer,
    api: Api,
    open_stream: Callable[..., Stream],
    leaser: Callable[..., Leaser],
) -> None:
    s = await start_server(POOLS, name="qa-slow", limits={"watch_buffer": 10})
    await s.wait_ready("q", 3)
    reference = open_stream(s.address, expiring_lead_seconds=-1)
    # A small window of its own (no BDP growth): the server's buffer fills soon.
    slow_channel = grpc.aio.insecure_channel(
        s.address,
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 1024),
        ],
    )
    try:
        stub = api.adm_grpc.VMPoolExtensionServiceStub(slow_channel)
        call = stub.WatchLeases(api.adm.WatchLeasesRequest(expiring_lead_seconds=-1))
        first = [await call.read()]  # the HEARTBEAT: open
        await reference.opened()
        c = leaser(s.address)
        for _ in range(60):
            lease = await c.lease("slow")
            await c.return_(lease.instance, "slow")
        await reference.until(lambda: len(reference.changes()) == 120)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (event := await call.read()) is not grpc.aio.EOF:
                first.append(event)
    finally:
        await slow_channel.close()
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = ended.value.details() or ""
    assert "fell 10 events behind" in details
    cursor = details.split('after="', 1)[1].split('"', 1)[0]
    rest = open_stream(s.address, after=cursor, expiring_lead_seconds=-1)
    last = reference.changes()[-1].cursor
    await rest.until(lambda: any(e.cursor == last for e in rest.events))
    got = [e for e in first if api.name(e) != "HEARTBEAT"] + rest.changes()
    assert _key(api, got) == _key(api, reference.changes())


# --- vmpool watch, as a user runs it ---------------------------------------------


async def test_cli_watch_piped_into_head_exits_when_head_does(
    start_server: StartServer, leaser: Callable[..., Leaser]
) -> None:
    """`vmpool watch --output json | head -1`: once head has its line and leaves,
    the next event ends vmpool watch quietly (141, as SIGPIPE), no resuming."""
    s = await start_server(POOLS, name="qa-cli-pipe")
    await s.wait_ready("q", 3)
    read_end, write_end = os.pipe()
    watch = ("watch", "--output", "json", "--snapshot")
    async with cli_running(s, *watch, stdout=write_end) as proc:
        os.close(write_end)
        head = asyncio.StreamReader()
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(head), os.fdopen(read_end, "rb")
        )
        try:
            while json.loads(await asyncio.wait_for(head.readline(), 30))["type"] != "SNAPSHOT_END":
                pass
            c = leaser(s.address)
            await c.lease("pipe")
            assert json.loads(await asyncio.wait_for(head.readline(), 15))["type"] == "LEASED"
            pipe.close()  # head has its line and leaves
            await c.lease("pipe")  # vmpool watch writes it to a pipe nobody reads
            _, err = await asyncio.wait_for(proc.communicate(), 15)
        finally:
            pipe.close()
    assert proc.returncode == 141, err.decode()
    assert err.decode() == ""


async def test_cli_watch_snapshot_end_has_a_time_for_people(
    start_server: StartServer, open_stream: Callable[..., Stream]
) -> None:
    """SNAPSHOT_END was sent without a time: JSON said 1970, the human line
    "499075h10m ago"."""
    s = await start_server(POOLS, name="qa-cli-snap")
    w = open_stream(s.address, snapshot=True)
    await w.opened()
    end = w.events[-1]
    assert w.api.name(end) == "SNAPSHOT_END"
    assert abs(end.time.seconds - time.time()) < 60
    async with cli_running(s, "watch", "--snapshot") as proc:
        assert proc.stdout is not None
        text = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert text.split()[:2] == ["now", "SNAPSHOT_END"], text
    assert (proc.returncode, err.decode()) == (130, "")
