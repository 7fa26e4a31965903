"""Identity end to end (identity.md): each auth mode through grpcio over TLS,
two identities trying each other's leases, reservations and the admin API, a
quota flood from one owner while another is served, certificate rotation."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from tests.e2e.clients import RpcError
from tests.e2e.conftest import Running, lease_when_free, server_config
from tests.e2e.grpcio_stack import GrpcioModules
from tests.e2e.identity_kit import EXTENSION, Issuer, Pki, TlsClient, plaintext_client
from tests.fakekube.server import FakeKube, ServiceAccountToken
from tests.pg import TestPostgres
from tests.polling import eventually
from tests.prerequisites import non_loopback_address, require
from tests.server import ServerProcess, free_port
from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi
from vmpool.proto.vmpool.admin import v1 as adm

POOL_SERVICE = "/intrinsic_proto.vmpoolapi.v1.VMPoolService/"

POOLS = [
    {"name": "p", "min_ready": 2, "max_size": 4},
    {"name": "q", "min_ready": 0, "max_size": 0},  # never has a VM: reservations queue
]
StartServer = Callable[..., Awaitable[Running]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki: Pki, *, client_ca: bool = False, require: bool = False) -> dict[str, Any]:
    server = pki.server()
    out: dict[str, Any] = {"cert_file": str(server.cert), "key_file": str(server.key)}
    if client_ca:
        out["client_ca_file"] = str(pki.ca)
        out["require_client_cert"] = require
    return out


@pytest.fixture
async def clients() -> AsyncIterator[list[Any]]:
    made: list[Any] = []
    yield made
    for c in made:
        await c.close()


async def code_of(call: Awaitable[Any]) -> tuple[str, str]:
    try:
        await call
    except RpcError as err:
        return err.code, err.message
    return "OK", ""


def leases_of(reply: bytes) -> list[adm.LeaseInfo]:
    return adm.ListLeasesResponse().parse(reply).leases


async def _cross_checks(owner: TlsClient, other: TlsClient, tag: str, running: Running) -> None:
    """``other`` must not act on ``owner``'s lease or reservation."""
    lease = await lease_when_free(owner, "p", service_tag=tag)
    later = datetime.now(UTC) + timedelta(minutes=40)
    code, msg = await code_of(other.return_(lease.instance, tag))
    assert code == "PERMISSION_DENIED", msg
    assert "another principal" in msg
    code, msg = await code_of(other.extend_to(lease.instance, later, tag))
    assert code == "PERMISSION_DENIED", msg
    code, _ = await code_of(owner.return_(lease.instance, tag + "-wrong"))
    assert code == "PERMISSION_DENIED"
    rid = str(uuid.uuid4())
    code, msg = await code_of(owner.lease("q", service_tag=tag, reservation_id=rid))
    assert code == "RESOURCE_EXHAUSTED" and "queued at position" in msg
    code, msg = await code_of(other.lease("q", service_tag=tag, reservation_id=rid))
    assert code == "PERMISSION_DENIED", msg
    assert "reservation" in msg
    # The lease is intact and its owner still controls it.
    rows = await running.sql("SELECT principal FROM leases WHERE instance = $1", lease.instance)
    assert len(rows) == 1
    await owner.extend_to(lease.instance, later, tag)
    await owner.return_(lease.instance, tag)


async def _reads_are_scoped(
    instance: str, *, owner: TlsClient, other: TlsClient, admin: TlsClient
) -> None:
    """GetLease and DescribeInstance answer the owner and the admin; to another
    principal the lease does not exist: the very answer for a name never leased."""
    describe = bytes(adm.DescribeInstanceRequest(instance=instance))
    absent = "vmp-0000-nosuchvm"
    missing = [
        await code_of(other.get_lease(absent)),
        await code_of(
            other.admin("DescribeInstance", bytes(adm.DescribeInstanceRequest(absent)), EXTENSION)
        ),
    ]
    hidden = [
        await code_of(other.get_lease(instance)),
        await code_of(other.admin("DescribeInstance", describe, EXTENSION)),
    ]
    assert [code for code, _ in hidden] == ["NOT_FOUND", "NOT_FOUND"], hidden
    assert [msg.replace(instance, absent) for _, msg in hidden] == [m for _, m in missing]
    for reader in (owner, admin):
        assert (await reader.get_lease(instance)).instance == instance
        got = adm.DescribeInstanceResponse().parse(
            await reader.admin("DescribeInstance", describe, EXTENSION)
        )
        assert (got.instance.instance, got.instance.owner) == (instance, "team-a")
    assert await other.pools()  # Pools stays readable by any authenticated caller


async def _stopped_by_the_operator(running: Running, instance: str, *, admin: TlsClient) -> None:
    """StopLease: history names the operator who ended the lease (beside its owner),
    and the call's audit line names the lease and its pool."""
    stop = bytes(papi.StopLeaseRequest(lease_name=instance))
    await admin.admin("StopLease", stop, POOL_SERVICE)
    rows = await running.sql(
        "SELECT principal, ended_by FROM lease_history WHERE instance = $1", instance
    )
    assert [tuple(r) for r in rows] == [("spiffe://test/alice", "ops")]
    stopped = await eventually(
        lambda: asyncio.sleep(0, [a for a in _audit_lines(running) if a["action"] == "StopLease"]),
        lambda lines: len(lines) == 1,
        30,
        "the StopLease audit line",
    )
    assert {
        "principal": "ops",
        "instance": instance,
        "pool": "p",
        "owner": "spiffe://test/alice",
        "outcome": "ok",
    }.items() <= stopped[0].items()


async def test_mtls_identities_cannot_touch_each_others_work(
    start_server: StartServer, pki: Pki, grpcio_modules: GrpcioModules, clients: list[Any]
) -> None:
    running = await start_server(
        POOLS,
        name="mtls",
        tls=tls_config(pki, client_ca=True, require=True),
        auth={
            "mode": "mtls",
            "policy": [
                {"subject": "ops", "roles": ["admin"]},
                {"subject": "spiffe://test/*", "roles": ["lease"], "service_tags": ["team-*"]},
            ],
        },
    )
    alice = pki.issue("alice", cn="alice", uris=("spiffe://test/alice",))
    bob = pki.issue("bob", cn="bob", dns=("bob.test",))
    ops = pki.issue("ops", cn="ops")

    def client(identity: Any = None) -> TlsClient:
        c = TlsClient(running.address, grpcio_modules, pki.ca, identity=identity)
        clients.append(c)
        return c

    a, b, o = client(alice), client(bob), client(ops)
    await _cross_checks(a, b, "team-a", running)
    # A tag outside alice's globs is refused, naming it.
    code, msg = await code_of(a.lease("p", service_tag="prod"))
    assert code == "PERMISSION_DENIED" and '"prod"' in msg
    # The admin API: refused to a non-admin, served to the admin with owners.
    lease = await lease_when_free(a, "p", service_tag="team-a")
    code, _ = await code_of(b.admin("ListLeases"))
    assert code == "PERMISSION_DENIED"
    listed = leases_of(await o.admin("ListLeases"))
    assert [(x.instance, x.principal) for x in listed] == [(lease.instance, "spiffe://test/alice")]
    await _reads_are_scoped(lease.instance, owner=a, other=b, admin=o)
    # Every state change has an audit line: who, which tag, pool, instance, outcome.
    audits = _audit_lines(running)
    assert {
        "action": "Return",
        "outcome": "PERMISSION_DENIED",
        "principal": "bob.test",
        "service_tag": "team-a",
    }.items() <= next(a for a in audits if a["principal"] == "bob.test").items()
    granted = [a for a in audits if a["action"] == "Lease" and a["outcome"] == "ok"]
    assert granted[-1]["instance"] == lease.instance and granted[-1]["pool"] == "p"
    assert granted[-1]["principal"] == "spiffe://test/alice"
    await _stopped_by_the_operator(running, lease.instance, admin=o)
    # No client certificate: the handshake is refused; plaintext too.
    code, _ = await code_of(client().ping())
    assert code == "UNAVAILABLE"
    plain = plaintext_client(running.address, grpcio_modules)
    clients.append(plain)
    code, _ = await code_of(plain.ping())
    assert code == "UNAVAILABLE"
    running.assert_clean_log()


def _log_lines(running: Running, event: str) -> list[dict[str, Any]]:
    out = []
    for line in running.proc.log().splitlines():
        if f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event:
                out.append(record)
    return out


def _audit_lines(running: Running) -> list[dict[str, Any]]:
    return _log_lines(running, "audit")


def _rpc_lines(running: Running) -> list[dict[str, Any]]:
    return _log_lines(running, "rpc")


@pytest.fixture
async def jwks_server() -> AsyncIterator[tuple[Issuer, str]]:
    issuer = Issuer()

    async def keys(_: web.Request) -> web.Response:
        return web.json_response(issuer.jwks())

    app = web.Application()
    app.router.add_get("/jwks", keys)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield issuer, f"http://{host}:{port}/jwks"
    await runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_jwt_mode(
    start_server: StartServer,
    pki: Pki,
    grpcio_modules: GrpcioModules,
    clients: list[Any],
    jwks_server: tuple[Issuer, str],
) -> None:
    issuer, url = jwks_server
    auth = {
        "mode": "jwt",
        "jwt": {"issuer": issuer.url, "audiences": ["vmpool"], "jwks_url": url},
        "policy": [{"subject": "group:vmpool-admins", "roles": ["admin"]}],
    }
    running = await start_server(POOLS, name="jwt", tls=tls_config(pki), auth=auth)

    def client(**kw: Any) -> TlsClient:
        c = TlsClient(running.address, grpcio_modules, pki.ca, **kw)
        clients.append(c)
        return c

    alice = client(token=issuer.token("alice"))
    bob = client(token=issuer.token("bob"))
    await _cross_checks(alice, bob, "ci", running)
    # The Go client's cookie carries the same identity.
    by_cookie = client(cookie=issuer.token("alice"))
    lease = await lease_when_free(alice, "p", service_tag="ci")
    await by_cookie.return_(lease.instance, "ci")

    admin = client(token=issuer.token("carol", groups=("vmpool-admins",)))
    assert leases_of(await admin.admin("ListLeases")) == []
    carol = [r for r in _rpc_lines(running) if r.get("principal") == "carol"]
    assert carol and carol[-1]["groups"] == ["vmpool-admins"]  # who, on the call's line
    assert (await code_of(bob.admin("ListLeases")))[0] == "PERMISSION_DENIED"

    # The CLI over TLS with a token (flag, file, env).
    token_file = running.proc.workdir / "token"
    token_file.write_text(issuer.token("erin") + "\n")
    base = ["--server", running.address, "--ca", str(pki.ca), "-o", "json"]
    ok = await _cli([*base, "--token-file", str(token_file), "pools"])
    assert ok[0] == 0 and '"p"' in ok[1], ok
    ok = await _cli(
        [*base, "--tls-server-name", "localhost", "pools"], VMPOOL_TOKEN=issuer.token("erin")
    )
    assert ok[0] == 0, ok
    refused = await _cli([*base, "pools"])
    assert refused[0] != 0 and "UNAUTHENTICATED" in refused[2], refused

    stranger = Issuer()
    for bad in (
        client(),
        client(token="not-a-jwt"),
        client(token=issuer.token("alice", lifetime=-120)),
        client(token=issuer.token("alice", audience="other")),
        client(token=issuer.token("alice", issuer="https://evil.test")),
        client(token=issuer.token("alice", key=stranger.keys[stranger.kid])),
    ):
        code, msg = await code_of(bad.lease("p", service_tag="ci"))
        assert code == "UNAUTHENTICATED", msg
    # A rotated key (new kid) is fetched again from the JWKS.
    issuer.rotate()
    rotated = client(token=issuer.token("dave"))
    # Fetched again once the refresh gap (10 s) since the last fetch has passed.
    await _eventually_ok(rotated.pools, 15)

    # The JWKS cannot be reached: UNAVAILABLE, never a silent allow.
    down = {**auth, "jwt": {**auth["jwt"], "jwks_url": f"http://127.0.0.1:{_closed_port()}/"}}
    broken = await start_server(POOLS, name="jwt-down", tls=tls_config(pki), auth=down)
    c = TlsClient(broken.address, grpcio_modules, pki.ca, token=issuer.token("alice"))
    clients.append(c)
    code, msg = await code_of(c.lease("p", service_tag="ci"))
    assert code == "UNAVAILABLE", msg


async def _cli(argv: list[str], **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmpool",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "VMPOOL_TOKEN": "", **env},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _eventually_ok(call: Callable[[], Awaitable[Any]], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        code, msg = await code_of(call())
        if code == "OK":
            return
        assert code == "UNAUTHENTICATED", msg
        assert loop.time() < deadline, msg
        await asyncio.sleep(0.5)


async def test_kubernetes_mode(
    start_server: StartServer,
    pki: Pki,
    grpcio_modules: GrpcioModules,
    clients: list[Any],
    tmp_path: Path,
) -> None:
    kube = FakeKube()
    await kube.start()
    try:
        sa = "system:serviceaccount:"
        groups = ["system:serviceaccounts", "system:authenticated"]
        kube.service_tokens = {
            "tok-a": ServiceAccountToken(f"{sa}team-a:ci", groups, ["vmpool"]),
            "tok-b": ServiceAccountToken(f"{sa}team-b:ci", groups, ["vmpool"]),
            "tok-ops": ServiceAccountToken(f"{sa}ops:admin", [*groups, "ops"], ["vmpool"]),
            "tok-aud": ServiceAccountToken(f"{sa}team-a:ci", groups, ["other"]),
            "tok-old": ServiceAccountToken(f"{sa}team-a:ci", groups, ["vmpool"], expires=1),
            "tok-late": ServiceAccountToken(f"{sa}team-c:ci", groups, ["vmpool"]),
        }
        running = await start_server(
            POOLS,
            name="kube",
            tls=tls_config(pki),
            auth={
                "mode": "kubernetes",
                "kubernetes": {"kubeconfig": str(kube.write_kubeconfig(tmp_path / "kc"))},
                "policy": [{"subject": "group:ops", "roles": ["admin"]}],
            },
        )

        def client(token: str | None) -> TlsClient:
            c = TlsClient(running.address, grpcio_modules, pki.ca, token=token)
            clients.append(c)
            return c

        a, b, ops = client("tok-a"), client("tok-b"), client("tok-ops")
        await _cross_checks(a, b, "ci", running)
        reviews = kube.token_reviews
        await a.pools()
        assert kube.token_reviews == reviews  # cached
        assert (await code_of(b.admin("ListLeases")))[0] == "PERMISSION_DENIED"
        assert leases_of(await ops.admin("ListLeases")) == []
        for bad in ("tok-unknown", "tok-aud", "tok-old", None):
            code, msg = await code_of(client(bad).pools())
            assert code == "UNAUTHENTICATED", (bad, msg)
        # The TokenReview is refused (no system:auth-delegator): UNAVAILABLE.
        kube.token_reviews_forbidden = True
        code, msg = await code_of(client("tok-late").pools())
        assert code == "UNAVAILABLE", msg
        running.assert_clean_log()
    finally:
        await kube.stop()


async def test_quota_flood_from_one_owner_leaves_room_for_another(
    start_server: StartServer, pki: Pki, grpcio_modules: GrpcioModules, clients: list[Any]
) -> None:
    admin_port = free_port()
    running = await start_server(
        [{"name": "p", "min_ready": 0, "max_size": 8}],
        name="quota",
        tls=tls_config(pki),
        limits={"max_queued_reservations": 5},
        admin_listen=f"127.0.0.1:{admin_port}",
    )
    c = TlsClient(running.address, grpcio_modules, pki.ca)
    clients.append(c)
    flood = await asyncio.gather(
        *(
            code_of(c.lease("p", service_tag="flood", reservation_id=str(uuid.uuid4())))
            for _ in range(30)
        )
    )
    quota = 'owner "flood" has 5 queued reservations in pool "p", the limit'
    refused = [m for code, m in flood if code == "RESOURCE_EXHAUSTED" and m == quota]
    admitted = [m for code, m in flood if "queued at position" in m or code == "OK"]
    assert (len(admitted), len(refused)) == (5, 25), flood
    rows = await running.sql("SELECT count(*) AS n FROM reservations WHERE owner = 'flood'")
    assert rows[0]["n"] == 5  # refused ones wrote nothing
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{running.proc.metrics_port}/metrics") as resp,
    ):
        metrics = await resp.text()
    assert 'vmpool_owner_refusals_total{owner="flood",reason="queued_quota"} 25.0' in metrics
    assert 'vmpool_owner_reservations_total{owner="flood"} 5.0' in metrics
    # admin_listen serves the operators' API only.
    ops = TlsClient(f"127.0.0.1:{admin_port}", grpcio_modules, pki.ca)
    clients.append(ops)
    queued = adm.ListReservationsResponse().parse(await ops.admin("ListReservations"))
    assert {r.service_tag for r in queued.reservations} == {"flood"}
    assert (await code_of(ops.pools()))[0] == "UNIMPLEMENTED"
    # Another owner is still served.
    rid = str(uuid.uuid4())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        code, msg = await code_of(c.lease("p", service_tag="other", reservation_id=rid))
        if code == "OK":
            break
        assert code == "RESOURCE_EXHAUSTED" and "queued" in msg, msg
        assert loop.time() < deadline, msg
        await asyncio.sleep(0.2)


def _served_cert(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


async def test_rotated_certificates_serve_new_connections_and_keep_old_ones(
    start_server: StartServer, pki: Pki, grpcio_modules: GrpcioModules, clients: list[Any]
) -> None:
    first = pki.server("rotating")
    running = await start_server(
        POOLS,
        name="rotate",
        tls={"cert_file": str(first.cert), "key_file": str(first.key)},
    )
    c = TlsClient(running.address, grpcio_modules, pki.ca)
    clients.append(c)
    assert await c.ping() == "pong"
    before = await asyncio.to_thread(_served_cert, running.proc.port, pki.ca)
    fresh = pki.server("rotated")
    # cert-manager writes both files in place.
    first.key.write_bytes(fresh.key.read_bytes())
    first.cert.write_bytes(fresh.cert.read_bytes())
    after = await asyncio.to_thread(_served_cert, running.proc.port, pki.ca)
    assert after != before
    assert await c.ping() == "pong"  # the connection opened before still works
    assert "tls certificates reloaded" in running.proc.log()


async def test_ping_needs_no_credentials_but_leasing_does(
    start_server: StartServer, pki: Pki, grpcio_modules: GrpcioModules, clients: list[Any]
) -> None:
    issuer = Issuer()
    jwks = pki.root / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    running = await start_server(
        POOLS,
        name="ping",
        tls=tls_config(pki),
        auth={"mode": "jwt", "jwt": {"issuer": issuer.url, "jwks_file": str(jwks)}},
    )
    anonymous = TlsClient(running.address, grpcio_modules, pki.ca)
    clients.append(anonymous)
    assert await anonymous.ping() == "pong"  # readiness probes carry no token
    assert (await code_of(anonymous.pools()))[0] == "UNAUTHENTICATED"
    assert (await code_of(anonymous.admin("PoolStats")))[0] == "UNAUTHENTICATED"
    # Without credentials nobody's lease or reservation can be touched, even
    # knowing the instance, the tag and the reservation id.
    alice = TlsClient(running.address, grpcio_modules, pki.ca, token=issuer.token("alice"))
    clients.append(alice)
    lease = await lease_when_free(alice, "p", service_tag="ci")
    rid = str(uuid.uuid4())
    code, msg = await code_of(alice.lease("q", service_tag="ci", reservation_id=rid))
    assert code == "RESOURCE_EXHAUSTED" and "queued at position" in msg, msg
    later = datetime.now(UTC) + timedelta(minutes=40)
    for call in (
        anonymous.return_(lease.instance, "ci"),
        anonymous.extend_to(lease.instance, later, "ci"),
        anonymous.lease("q", service_tag="ci", reservation_id=rid),
    ):
        assert (await code_of(call))[0] == "UNAUTHENTICATED"
    await alice.extend_to(lease.instance, later, "ci")  # still alice's
    await alice.return_(lease.instance, "ci")


async def test_anonymous_admin_only_from_loopback(
    postgres: TestPostgres, grpcio_modules: GrpcioModules, tmp_path: Path
) -> None:
    with non_loopback_address() as address:
        require(address is not None, "an address that is not loopback (none, and not root)")
        assert address is not None
        await _anonymous_admin_only_from_loopback(address, postgres, grpcio_modules, tmp_path)


async def _anonymous_admin_only_from_loopback(
    address: str, postgres: TestPostgres, grpcio_modules: GrpcioModules, tmp_path: Path
) -> None:
    port = free_port()
    proc = ServerProcess(
        server_config(POOLS, listen=f"0.0.0.0:{port}"),
        tmp_path,
        database_url=await postgres.fresh(),
        port=port,
    )
    with proc:

        async def log() -> str:
            return proc.log()

        # The start-up warning names the risk.
        await eventually(log, lambda text: "auth.mode none on 0.0.0.0" in text, 10, "the warning")
        await _admin_from(address, port, grpcio_modules)


async def _admin_from(address: str, port: int, grpcio_modules: GrpcioModules) -> None:
    remote = grpc.aio.insecure_channel(f"{address}:{port}")
    local = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        for channel, expected in ((remote, grpc.StatusCode.PERMISSION_DENIED), (local, None)):
            call = channel.unary_unary("/vmpool.admin.v1.VMPoolAdminService/ListLeases")
            try:
                await call(b"", timeout=10)
            except grpc.aio.AioRpcError as err:
                assert err.code() == expected, err.details()
                assert "loopback" in (err.details() or "")
            else:
                assert expected is None
        # Leasing itself is open to anyone in mode none (the tag decides).
        remote_client = plaintext_client(f"{address}:{port}", grpcio_modules)
        lease = await lease_when_free(remote_client, "p", service_tag="anyone")
        await remote_client.return_(lease.instance, "anyone")
        await remote_client.close()
    finally:
        await remote.close()
        await local.close()
