"""What Kubernetes and Prometheus see: readiness as a gRPC health service name that
follows the database, liveness that does not, and the /metrics endpoint."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from tests.e2e.clients import Client, RpcError
from tests.e2e.conftest import Running
from tests.e2e.pgproxy import PgProxy
from tests.ops.conftest import sample, scrape
from tests.pg import TestPostgres
from tests.polling import eventually
from tests.server import free_port
from vmpool.services.readiness import PROVIDER, READY

POOLS = [
    {"name": "alpha", "min_ready": 1, "max_size": 3},
    {"name": "one", "min_ready": 0, "max_size": 1},
]
LEASE_SERVICE = "intrinsic_proto.vmpoolleaseapi.v1.VMPoolLeaseService"
HEALTH_PORT = free_port()  # health_listen: plaintext health only (probes when TLS is on)


@pytest.fixture(scope="module")
async def proxy(postgres: TestPostgres) -> AsyncIterator[PgProxy]:
    p = await PgProxy(postgres.url).start()
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def server(
    start_server: Callable[..., Awaitable[Running]], postgres: TestPostgres, proxy: PgProxy
) -> AsyncIterator[Running]:
    direct = await postgres.fresh()
    database = urllib.parse.urlsplit(direct).path.lstrip("/")
    running = await start_server(
        POOLS, db_url=proxy.url(database), name="probes", health_listen=f"127.0.0.1:{HEALTH_PORT}"
    )
    running.db_url = direct
    await running.wait_ready("alpha", 1)
    yield running
    proxy.set_mode("pass")


async def health(server: Running, service: str, port: int | None = None) -> str:
    host, lease_port = server.address.rsplit(":", 1)
    channel = Channel(host, port or int(lease_port))
    try:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=5)
    finally:
        channel.close()
    return str(HealthCheckResponse.ServingStatus.Name(reply.status))


async def test_readiness_follows_the_database_and_liveness_does_not(
    server: Running, proxy: PgProxy
) -> None:
    assert await health(server, READY) == "SERVING"
    assert await health(server, LEASE_SERVICE) == "SERVING"
    assert await health(server, "") == "SERVING"
    proxy.set_mode("refuse")
    try:
        await eventually(
            lambda: health(server, READY), lambda s: s == "NOT_SERVING", 10, "not ready"
        )
        assert await health(server, LEASE_SERVICE) == "NOT_SERVING"
        assert await health(server, "") == "SERVING", "liveness never looks at the database"
        # The health-only port says the same.
        assert await health(server, READY, HEALTH_PORT) == "NOT_SERVING"
        assert await health(server, "", HEALTH_PORT) == "SERVING"
    finally:
        proxy.set_mode("pass")
    await eventually(lambda: health(server, READY), lambda s: s == "SERVING", 15, "ready again")
    assert await health(server, READY, HEALTH_PORT) == "SERVING"
    log = server.proc.log()
    assert "Health check failed" not in log, "readiness reports, it does not log tracebacks"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def test_metrics_only_on_slash_metrics(server: Running) -> None:
    port = server.proc.metrics_port
    status, body = await asyncio.to_thread(get, port, "/metrics")
    assert status == 200 and "vmpool_rpc_requests_total" in body
    for path in ("/", "/favicon.ico", "/metrics/x", "/healthz"):
        status, body = await asyncio.to_thread(get, port, path)
        assert status == 404, (path, status)
        assert "vmpool_" not in body


async def test_build_info_process_and_pool_sizing_metrics(server: Running) -> None:
    families = await asyncio.to_thread(scrape, server.proc.metrics_port)
    (info,) = families["vmpool_build_info"].samples
    assert info.value == 1 and info.labels["version"] and re.match(r"3\.\d+", info.labels["python"])
    assert "process_cpu_seconds" in families and "process_resident_memory_bytes" in families
    assert "python_info" in families
    assert sample(families, "vmpool_pool_min_ready", pool="alpha") == 1
    assert sample(families, "vmpool_pool_max_size", pool="alpha") == 3
    assert sample(families, "vmpool_pool_max_size", pool="one") == 1


async def test_a_waiting_lease_is_timed_apart_from_its_latency(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    await server.wait_ready("alpha", 1)
    before = await asyncio.to_thread(scrape, server.proc.metrics_port)
    # "one" keeps no free VM: a reservation makes it provision one and set it aside.
    start = time.monotonic()
    blocker = await client.lease("one", reservation_id=str(uuid.uuid4()), wait="20s")
    started = time.monotonic()
    rid = str(uuid.uuid4())
    with pytest.raises(RpcError) as queued:
        await client.lease("one", reservation_id=rid, wait="2s")
    ended = time.monotonic()
    waited = ended - started
    assert queued.value.code == "RESOURCE_EXHAUSTED" and waited >= 1.5
    after = await asyncio.to_thread(scrape, server.proc.metrics_port)
    await client.return_(blocker.instance)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("vmpool_lease_wait_seconds_count") >= 1
    assert grew("vmpool_lease_wait_seconds_sum") >= 1.5
    # Lease's own latency leaves the wait out: latency and wait of the two calls
    # (blocker, waiter) add up to no more than the time the client saw them take
    # (counting the wait in both would pass it by the wait, at least 1.5 s),
    # however slow the machine.
    lease_sum = grew("vmpool_rpc_duration_seconds_sum", method="Lease")
    wait_sum = grew("vmpool_lease_wait_seconds_sum")
    assert lease_sum + wait_sum <= ended - start, (
        f"Lease latency {lease_sum:.2f}s + wait {wait_sum:.2f}s > {ended - start:.2f}s "
        "the calls took: the latency counts the wait"
    )


async def test_label_values_have_no_spaces(server: Running) -> None:
    # Runs after a reservation was served: the reconciler's "set aside" is counted.
    families = await asyncio.to_thread(scrape, server.proc.metrics_port)
    for family in families.values():
        for s in family.samples:
            for key, value in s.labels.items():
                assert " " not in value, (s.name, key, value)
                if key in ("action", "reason", "step", "kind", "state", "operation"):
                    assert re.fullmatch(r"[a-z0-9_]+", value), (s.name, key, value)


async def test_the_health_port_serves_health_only(server: Running) -> None:
    from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api

    channel = Channel("127.0.0.1", HEALTH_PORT)
    try:
        with pytest.raises(GRPCError) as refused:
            await api.VmPoolLeaseServiceStub(channel).pools(api.PoolsRequest(), timeout=5)
    finally:
        channel.close()
    assert refused.value.status == Status.UNIMPLEMENTED


async def test_the_provider_health_name_is_served(server: Running) -> None:
    # SERVING while the leader's provider answers (the fake one always does);
    # NOT_SERVING only while it cannot be used (tests/integration/
    # test_reconciler.py drives that state).
    assert await health(server, PROVIDER) == "SERVING"
