"""A COMMIT that waits for a synchronous standby past database.command_timeout.

asyncpg gives up and cancels it; PostgreSQL then keeps the transaction
committed on the primary alone ("canceling wait for synchronous replication").
The client must hear UNAVAILABLE (retry), never OK (the change may not
survive a failover) nor INTERNAL, and its retry must find the state the
commit left: the same VM for a Lease with the same reservation_id, NOT_FOUND
for a Return already done. A private PostgreSQL (pgserver) whose
synchronous_standby_names names a standby that never connects: every commit
waits."""

from __future__ import annotations

import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.clients import Client, rpc_code
from tests.e2e.conftest import Running

pytestmark = pytest.mark.timeout(300)
POOL = "sync"


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    root = Path(tempfile.mkdtemp(prefix="vmpool-syncwait-"))
    root.chmod(0o755)  # as root, pgserver runs the server as another user
    server = pgserver.get_server(root / "pg", cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


async def waiting_for_a_ghost_standby(url: str, on: bool) -> None:
    conn = await asyncpg.connect(url)
    try:
        names = "ghost" if on else ""
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


@pytest.fixture
async def server(
    start_server: Callable[..., Awaitable[Running]], private_postgres: str
) -> AsyncIterator[Running]:
    running = await start_server(
        # Full and quiet: no reconciler write holds a row the calls need
        # (a transaction waiting for the standby keeps its locks).
        [{"name": POOL, "min_ready": 2, "max_size": 2}],
        db_url=private_postgres,
        name="syncwait",
        database={"command_timeout": "1s"},
        reconcile_interval="1h",
    )
    await running.wait_ready(POOL, 2)
    yield running
    await waiting_for_a_ghost_standby(private_postgres, False)


async def test_a_commit_cut_short_waiting_for_the_standby_is_unavailable_and_retry_finds_it(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    rid = str(uuid.uuid4())
    held = await client.lease(POOL)
    await waiting_for_a_ghost_standby(server.db_url, True)

    assert await rpc_code(client.lease(POOL, reservation_id=rid)) == "UNAVAILABLE"
    assert await rpc_code(client.return_(held.instance)) == "UNAVAILABLE"

    # The standby is back (here: no longer required): both changes are on the
    # primary although neither was acknowledged, and the retries find them.
    await waiting_for_a_ghost_standby(server.db_url, False)
    leases = await server.sql(
        "SELECT instance FROM leases WHERE reservation_id = $1", uuid.UUID(rid)
    )
    returned = await server.sql("SELECT 1 FROM leases WHERE instance = $1", held.instance)
    assert len(leases) == 1 and returned == []
    again = await client.lease(POOL, reservation_id=rid)
    assert again.instance == leases[0]["instance"]  # the same VM, not a second one
    assert await rpc_code(client.return_(held.instance)) == "NOT_FOUND"

    to = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    await waiting_for_a_ghost_standby(server.db_url, True)
    assert await rpc_code(client.extend_to(again.instance, to)) == "UNAVAILABLE"
    await waiting_for_a_ghost_standby(server.db_url, False)
    assert (await client.extend_to(again.instance, to)).expires == to  # repeated: the same
    await client.return_(again.instance)
    log = server.proc.log()
    assert "Traceback" not in log, log[-4000:]
