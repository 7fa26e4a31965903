"""Fixtures for the operational tests: real `vmpool serve` processes (stdout and
stderr kept apart, so stdout can be checked as JSON lines), a small grpclib
client that reports every outcome as a status name, /metrics scraping, and SQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError
from prometheus_client.parser import text_string_to_metric_families

from tests.pg import TestPostgres
from tests.server import ServerProcess, wait_for_port
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api

T = TypeVar("T")
TAG = "ops"


def server_config(pools: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "reconcile_interval": "0.3s",
        "log_level": "info",
        "provider": {"kind": "fake", "fake": {"boot_seconds": 0}},
        "pools": pools,
        **extra,
    }


class OpsServer(ServerProcess):
    """A ServerProcess whose stdout (the structured log) and stderr go to separate files."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.err_path = self.workdir / f"{self.log_path.stem}.stderr"

    def start(self, timeout: float = 30.0) -> OpsServer:
        out = self.log_path.open("ab")
        err = self.err_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmpool", "serve", "--config", str(self.config_path)],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=self.env,
        )
        out.close()
        err.close()
        wait_for_port(self.port, timeout, self.proc)
        if self.metrics_port:
            wait_for_port(self.metrics_port, timeout, self.proc)
        return self

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """stdout parsed as JSON lines; fails on any line that is not a JSON object."""
        out = []
        for n, line in enumerate(self.log().splitlines(), 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"{self.log_path.name} line {n} is not JSON: {line[:300]!r}")
            assert isinstance(rec, dict), f"line {n} is not a JSON object: {line[:300]!r}"
            out.append(rec)
        return out

    def assert_no_traceback(self) -> None:
        for text in (self.log(), self.stderr()):
            assert "Traceback" not in text, text[-4000:]

    def metrics(self) -> dict[str, Any]:
        return scrape(self.metrics_port)


def scrape(port: int) -> dict[str, Any]:
    """/metrics as {family name: Metric} (prometheus_client's own parser)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


async def ascrape(port: int) -> dict[str, Any]:
    return await asyncio.to_thread(scrape, port)


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of sample ``name`` with exactly ``labels`` (0.0 if absent)."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


@pytest.fixture(scope="module")
async def start_server(
    postgres: TestPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Callable[..., Awaitable[OpsServer]]]:
    """Start servers (on a fresh database unless one is given); stopped at module end."""
    started: list[OpsServer] = []

    async def start(
        pools: list[dict[str, Any]],
        *,
        db_url: str | None = None,
        name: str = "server",
        **extra: Any,
    ) -> OpsServer:
        url = db_url or await postgres.fresh()
        proc = OpsServer(
            server_config(pools, **extra),
            tmp_path_factory.mktemp(name),
            database_url=url,
            name=name,
        )
        proc.db_url = url  # type: ignore[attr-defined]
        started.append(proc)
        await asyncio.to_thread(proc.start)
        return proc

    yield start
    await asyncio.gather(*(asyncio.to_thread(p.__exit__) for p in started))


class Sql:
    def __init__(self, url: str) -> None:
        self.url = url

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def val(self, query: str, *args: Any) -> Any:
        rows = await self.fetch(query, *args)
        return rows[0][0]

    async def counts(self, pool: str) -> dict[str, int]:
        rows = await self.fetch(
            "SELECT state, count(*) AS n FROM instances WHERE pool = $1 GROUP BY state", pool
        )
        return {r["state"]: int(r["n"]) for r in rows}

    async def names(self, table: str, pool: str) -> set[str]:
        assert table in ("instances", "fake_vms")
        rows = await self.fetch(f"SELECT name FROM {table} WHERE pool = $1", pool)
        return {r["name"] for r in rows}


class Outcome(Exception):
    """A failed call: ``code`` is the gRPC status name, or a transport error's class."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    """The project's own stack (grpclib + betterproto stubs); errors become Outcome."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.channel = Channel(host, int(port))
        self.stub = api.VmPoolLeaseServiceStub(self.channel)

    async def _call(self, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except GRPCError as err:
            raise Outcome(err.status.name, err.message or "") from None
        except (StreamTerminatedError, ConnectionError, OSError, TimeoutError) as err:
            raise Outcome(type(err).__name__, str(err)) from None

    async def ping(self, timeout: float = 5.0) -> str:
        return (await self._call(self.stub.ping(Empty(), timeout=timeout))).msg

    async def lease(
        self,
        pool: str,
        *,
        reservation_id: str | None = None,
        wait: str | None = None,
        tag: str = TAG,
        timeout: float = 10.0,
    ) -> api.Lease:
        metadata = {"x-vmpool-wait": wait} if wait else None
        request = api.LeaseRequest(pool=pool, service_tag=tag, reservation_id=reservation_id)
        reply = await self._call(self.stub.lease(request, timeout=timeout, metadata=metadata))
        return reply.lease

    async def return_(self, instance: str, tag: str = TAG, timeout: float = 10.0) -> None:
        await self._call(
            self.stub.return_(
                api.ReturnRequest(instance=instance, service_tag=tag), timeout=timeout
            )
        )

    def close(self) -> None:
        self.channel.close()


async def code_of(call: Awaitable[Any]) -> str:
    try:
        await call
    except Outcome as err:
        return err.code
    return "OK"


async def lease_when_free(client: Client, pool: str, timeout: float = 30.0) -> api.Lease:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.lease(pool)
        except Outcome as err:
            if err.code != "RESOURCE_EXHAUSTED" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


def cli(*args: str, server: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the `vmpool` console command (as `python -m vmpool`)."""
    return subprocess.run(
        [sys.executable, "-m", "vmpool", *args, "--server", server],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
