"""End-to-end fixtures: a real `vmpool serve` process on a fresh database, and
clients over two independent gRPC stacks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import pytest

from tests.e2e.clients import Client, RpcError, make_client
from tests.e2e.grpcio_stack import GrpcioModules
from tests.pg import TestPostgres
from tests.polling import eventually
from tests.server import ServerProcess

CLIENT_KINDS = ["grpclib", "grpcio"]
T = TypeVar("T")


def server_config(pools: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "reconcile_interval": "0.2s",
        "log_level": "info",
        "provider": {"kind": "fake", "fake": {"boot_seconds": 0}},
        "pools": pools,
        **extra,
    }


@dataclass
class Running:
    """A started server and the database it uses."""

    proc: ServerProcess
    db_url: str

    @property
    def address(self) -> str:
        return self.proc.address

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.db_url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def ready_count(self, pool: str) -> int:
        rows = await self.sql(
            "SELECT count(*) AS n FROM instances WHERE pool = $1 AND state = 'ready'", pool
        )
        return int(rows[0]["n"])

    async def wait_ready(self, pool: str, n: int, timeout: float = 30.0) -> None:
        await eventually(
            lambda: self.ready_count(pool),
            lambda got: got >= n,
            timeout,
            f"{n} ready instances in pool {pool}",
        )

    def assert_clean_log(self) -> None:
        log = self.proc.log()
        assert "Traceback" not in log, log[-4000:]


async def lease_when_free(client: Client, pool: str, timeout: float = 30.0, **kw: Any) -> Any:
    """Lease from ``pool``, retrying RESOURCE_EXHAUSTED while the pool refills
    (which takes a few reconcile passes, and longer on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.lease(pool, **kw)
        except RpcError as err:
            if err.code != "RESOURCE_EXHAUSTED" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def start_server(
    postgres: TestPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Start servers (each on a fresh database unless one is given); all are stopped
    at the end of the module."""
    started: list[ServerProcess] = []

    async def start(
        pools: list[dict[str, Any]],
        *,
        db_url: str | None = None,
        name: str = "server",
        args: tuple[str, ...] = (),
        port: int | None = None,
        **extra: Any,
    ) -> Running:
        url = db_url or await postgres.fresh()
        proc = ServerProcess(
            server_config(pools, **extra),
            tmp_path_factory.mktemp(name),
            database_url=url,
            name=name,
            args=args,
            port=port,
        )
        started.append(proc)
        # In a thread: the database may sit behind a proxy running on this loop.
        await asyncio.to_thread(proc.start)
        return Running(proc, url)

    yield start
    for proc in started:
        proc.__exit__()


@pytest.fixture(params=CLIENT_KINDS)
async def client(
    request: pytest.FixtureRequest, server: Running, grpcio_modules: GrpcioModules
) -> AsyncIterator[Client]:
    """A client of the module's ``server`` fixture, once per gRPC stack."""
    c = make_client(request.param, server.address, grpcio_modules)
    yield c
    await c.close()


@pytest.fixture
async def client_factory(
    grpcio_modules: GrpcioModules,
) -> AsyncIterator[Callable[[str, str], Client]]:
    """Clients for any server address; closed at the end of the test."""
    made: list[Client] = []

    def make(kind: str, address: str) -> Client:
        c = make_client(kind, address, grpcio_modules)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()
