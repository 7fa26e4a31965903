"""`vmpool serve --role` and `--reuse-port`, as processes on one database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from tests.e2e.clients import Client
from tests.e2e.conftest import Running, lease_when_free
from tests.e2e.pgproxy import PgProxy
from tests.ops.conftest import ascrape, sample
from tests.pg import TestPostgres
from tests.polling import eventually
from tests.server import ServerProcess, free_port

POOL = "roles"
POOLS = [{"name": POOL, "min_ready": 2, "max_size": 4}]
RECONCILER_EVENTS = {"provision", "create", "ready", "delete", "destroy", "lease expired"}


def events(proc: ServerProcess) -> list[dict[str, Any]]:
    out = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_an_api_process_and_a_reconciler_process_share_only_the_database(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
) -> None:
    reconciler = await start_server(POOLS, name="reconciler", args=("--role", "reconciler"))
    api = await start_server(POOLS, db_url=reconciler.db_url, name="api", args=("--role", "api"))
    await api.wait_ready(POOL, 2)  # filled by the reconciler process
    client = client_factory("grpclib", api.address)
    lease = await lease_when_free(client, POOL)
    await client.return_(lease.instance)

    # The Return's NOTIFY wakes the other process: the VM goes, the pool refills.
    async def state() -> tuple[int, int]:
        rows = await api.sql("SELECT count(*) AS n FROM instances WHERE name = $1", lease.instance)
        return int(rows[0]["n"]), await api.ready_count(POOL)

    await eventually(state, lambda s: s == (0, 2), 15, "returned VM destroyed, pool refilled")
    api_events = {e.get("event") for e in events(api.proc)}
    assert not api_events & RECONCILER_EVENTS, api_events
    assert not any(e.get("event") == "leadership acquired" for e in events(api.proc))
    assert any(e.get("event") == "leadership acquired" for e in events(reconciler.proc))
    for running in (api, reconciler):
        assert running.proc.terminate() == 0
        running.assert_clean_log()


async def test_a_reconciler_process_reports_its_database_in_its_metrics(
    start_server: Callable[..., Awaitable[Running]], postgres: TestPostgres
) -> None:
    # No readiness probe asks a reconciler process, and the chart scrapes it:
    # vmpool_database_up must follow the database, or VmpoolDatabaseUnreachable
    # fires for a healthy database (and never for a real outage).
    proxy = await PgProxy(postgres.url).start()
    try:
        database = urllib.parse.urlsplit(await postgres.fresh()).path.lstrip("/")
        reconciler = await start_server(
            POOLS,
            db_url=proxy.url(database),
            name="reconciler-metrics",
            args=("--role", "reconciler"),
        )
        port = reconciler.proc.metrics_port

        async def database() -> tuple[float, float, float]:
            families = await ascrape(port)
            return (
                sample(families, "vmpool_database_up"),
                sample(families, "vmpool_database_read_only"),
                sample(families, "vmpool_database_timeline"),
            )

        _, read_only, timeline = await eventually(
            database, lambda d: d[0] == 1, 15, "vmpool_database_up 1 on a reconciler process"
        )
        assert read_only == 0 and timeline >= 1
        proxy.set_mode("refuse")
        await eventually(database, lambda d: d[0] == 0, 20, "vmpool_database_up 0 (refused)")
        proxy.set_mode("pass")
        await eventually(database, lambda d: d[:2] == (1, 0), 20, "vmpool_database_up 1 again")
        # A database that hangs does not turn a requested stop into a failure.
        await eventually(
            lambda: asyncio.to_thread(reconciler.proc.log),
            lambda log: '"leadership acquired"' in log,
            20,
            "leading",
        )
        proxy.set_mode("blackhole")
        # In a thread: the proxy runs on this loop.
        assert await asyncio.to_thread(reconciler.proc.terminate) == 0
        reconciler.assert_clean_log()
    finally:
        proxy.set_mode("pass")
        await proxy.close()


async def test_a_busy_port_is_one_line_naming_it_and_exit_2(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    first = await start_server(POOLS, name="first")
    second = ServerProcess(
        {"pools": POOLS, "provider": {"kind": "fake"}},
        first.proc.workdir / "second",
        database_url=first.db_url,
        port=first.proc.port,
        name="second",
    )
    second.start()  # returns at once: the port answers (the first server)
    assert second.proc is not None
    code = await asyncio.to_thread(second.proc.wait, 30)
    assert code == 2
    lines = [line for line in second.log().splitlines() if line.strip()]
    problem = [line for line in lines if "address already in use" in line]
    assert problem == [
        f"vmpool: cannot start: listen 127.0.0.1:{first.proc.port}: address already in use"
        " (another process has it: choose another address with --listen)"
    ], lines
    assert "Traceback" not in second.log()


async def test_a_busy_metrics_port_names_the_flag_that_moves_it(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    # Prometheus's own default is 9090, the demo's metrics port: a newcomer running
    # Prometheus must be told how to start the demo anyway, and --metrics-listen must work.
    first = await start_server(POOLS, name="first")
    config = {"pools": POOLS, "provider": {"kind": "fake"}}
    workdir = first.proc.workdir
    second = ServerProcess(
        config, workdir / "second", database_url=first.db_url, metrics_port=first.proc.metrics_port
    )
    with contextlib.suppress(RuntimeError):  # "exited before listening": expected
        second.start()
    assert second.proc is not None
    assert await asyncio.to_thread(second.proc.wait, 30) == 2
    assert (
        f"vmpool: cannot start: metrics_listen 127.0.0.1:{first.proc.metrics_port}: address "
        "already in use (another process has it: choose another address with --metrics-listen)"
    ) in second.log().splitlines()
    moved = free_port()
    third = ServerProcess(
        config,
        workdir / "third",
        database_url=first.db_url,
        metrics_port=first.proc.metrics_port,
        name="third",
        args=("--metrics-listen", f"127.0.0.1:{moved}"),
    )

    def scrape() -> bytes:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{moved}/metrics", timeout=10) as r:
                return bytes(r.read())
        except OSError:  # gRPC answers first; /metrics is bound just after
            return b""

    async def scraped() -> bytes:
        return await asyncio.to_thread(scrape)

    with third:
        body = await eventually(scraped, bool, 30, "/metrics on the --metrics-listen port")
    assert b"vmpool_build_info" in body


async def test_reuse_port_shares_the_port_on_purpose(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
) -> None:
    first = await start_server(POOLS, name="shared1", args=("--reuse-port",))
    second = await start_server(
        POOLS,
        db_url=first.db_url,
        name="shared2",
        args=("--reuse-port",),
        port=first.proc.port,
    )
    await eventually(
        lambda: asyncio.to_thread(second.proc.log),
        lambda log: '"serving"' in log,
        15,
        "the second server serving",
    )
    await first.wait_ready(POOL, 2)
    client = client_factory("grpclib", first.address)
    assert (await lease_when_free(client, POOL)).pool == POOL
    for running in (first, second):
        assert running.proc.terminate() == 0
        running.assert_clean_log()
