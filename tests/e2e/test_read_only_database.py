"""The database turns read-only under a running server (as when its address
reaches a standby before the promotion): Lease, Return, the pool API and Ping
answer UNAVAILABLE, never INTERNAL; the process stays up; once the database
is writable again everything works without a restart, and the server stops
cleanly. (The same with a real standby: tests/chaos, h-failover-rw.)"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable

import asyncpg
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from tests.e2e.clients import Client, RpcError
from tests.e2e.conftest import Running, lease_when_free
from tests.pg import TestPostgres
from tests.polling import eventually
from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi

POOLS = [{"name": "alpha", "min_ready": 1, "max_size": 2}]


async def switch(postgres: TestPostgres, db_url: str, read_only: bool) -> None:
    name = urllib.parse.urlsplit(db_url).path.lstrip("/")
    admin = await asyncpg.connect(postgres.url)
    try:
        verb = (
            "SET default_transaction_read_only = on"
            if read_only
            else "RESET default_transaction_read_only"
        )
        await admin.execute(f"ALTER DATABASE {name} {verb}")
        # Every session ends, as the old primary's do; new ones see the switch.
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
    finally:
        await admin.close()


async def code(call: Awaitable[object]) -> str:
    try:
        await call
    except (RpcError, GRPCError) as err:
        return err.code if isinstance(err, RpcError) else err.status.name
    return "OK"


async def test_a_read_only_database_is_unavailable_and_the_server_recovers(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
    postgres: TestPostgres,
) -> None:
    server = await start_server(POOLS, name="read-only")
    client = client_factory("grpclib", server.address)
    host, _, port = server.address.rpartition(":")
    channel = Channel(host, int(port))
    pools = papi.VmPoolServiceStub(channel)
    try:
        await server.wait_ready("alpha", 1)
        held = await lease_when_free(client, "alpha")

        await switch(postgres, server.db_url, True)
        await asyncio.sleep(0.6)  # past the health check's cache of a good answer
        answers = set()
        for _ in range(5):
            answers.add(await code(client.lease("alpha")))
            answers.add(await code(client.return_(held.instance)))
            answers.add(await code(pools.list_pools(papi.ListPoolsRequest(), timeout=5)))
            answers.add(await code(client.ping()))
            await asyncio.sleep(0.3)
        assert answers == {"UNAVAILABLE"}, answers
        assert server.proc.proc is not None and server.proc.proc.poll() is None, "server exited"

        await switch(postgres, server.db_url, False)
        await eventually(lambda: code(client.ping()), lambda c: c == "OK", 20, "Ping OK again")
        await eventually(
            lambda: code(client.return_(held.instance)), lambda c: c == "OK", 20, "Return OK"
        )
        assert await code(pools.list_pools(papi.ListPoolsRequest(), timeout=5)) == "OK"
        lease = await lease_when_free(client, "alpha", timeout=20)
        await client.return_(lease.instance)
    finally:
        channel.close()
    assert await asyncio.to_thread(server.proc.terminate, 20) == 0
    log = server.proc.log()
    assert "Traceback" not in log and "rpc failed" not in log, log[-3000:]
    assert "fatal error" not in log, log[-3000:]
