"""The operator's commands over the admin API: `vmpool status` and `vmpool admin
leases|reservations`, run as the real console command. (Pool changes and
StopLease moved to VMPoolService: tests/e2e/test_pool_cli.py.)"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.ops.conftest import (
    Client,
    OpsServer,
    Outcome,
    Sql,
    cli,
    lease_when_free,
)
from tests.polling import eventually

POOLS = [
    {"name": "adm", "min_ready": 2, "max_size": 4},
    {"name": "drainme", "min_ready": 2, "max_size": 4},
    {"name": "full", "min_ready": 0, "max_size": 0},  # reservations stay queued
]


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[OpsServer]]) -> AsyncIterator[OpsServer]:
    s = await start_server(POOLS, name="admin")
    sql = Sql(s.db_url)  # type: ignore[attr-defined]
    for pool in ("adm", "drainme"):
        await eventually(
            lambda p=pool: sql.counts(p), lambda c: c == {"ready": 2}, 10, "pools filled"
        )
    yield s
    s.assert_no_traceback()


@pytest.fixture
def sql(server: OpsServer) -> Sql:
    return Sql(server.db_url)  # type: ignore[attr-defined]


async def run(server: OpsServer, *args: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(cli, *args, server=server.address)
    return done.returncode, done.stdout, done.stderr


def table(text: str) -> dict[str, dict[str, str]]:
    """`vmpool status` output as {pool: {column: value}}."""
    lines = text.strip().splitlines()
    heads = lines[0].split()
    out = {}
    for line in lines[1:]:
        cells = line.split()
        name = cells[0]
        notes = [c for c in cells[1:] if c.startswith("(")]
        values = [c for c in cells[1:] if not c.startswith("(")]
        assert len(values) == len(heads) - 1, line
        out[name] = dict(zip(heads[1:], values, strict=True)) | {"notes": " ".join(notes)}
    return out


async def test_status_prints_a_table_of_pools(server: OpsServer) -> None:
    client = Client(server.address)
    rid = str(uuid.uuid4())
    try:
        lease = await lease_when_free(client, "adm")
        with pytest.raises(Outcome):
            await client.lease("full", reservation_id=rid)
        await eventually(
            lambda: Sql(server.db_url).counts("adm"),  # type: ignore[attr-defined]
            lambda c: c == {"ready": 2, "leased": 1},
            10,
            "adm refilled",
        )
        await asyncio.sleep(0.5)  # the status reads the database; no need to wait more
        (rc, out, err), (rcj, outj, errj) = await asyncio.gather(
            run(server, "status"), run(server, "status", "--output", "json")
        )
        assert rc == 0, err
        head = out.splitlines()[0].split()
        assert head[:2] == ["POOL", "READY"] and "LEASED" in head and "QUEUED" in head, out
        rows = table(out)
        assert list(rows) == ["adm", "drainme", "full"], out
        assert rows["adm"]["READY"] == "2" and rows["adm"]["LEASED"] == "1", out
        assert rows["adm"]["MIN-READY"] == "2" and rows["adm"]["MAX-SIZE"] == "4", out
        assert "PROVISIONING" in head and "RESERVED" in head, "the words of the JSON and metrics"
        assert rows["full"]["QUEUED"] == "1" and rows["full"]["READY"] == "0", out
        assert rcj == 0, errj
        by_name = {p["name"]: p for p in json.loads(outj)}
        assert by_name["adm"]["leased"] == 1
    finally:
        await client.return_(lease.instance)
        client.close()


async def test_admin_leases_and_reservations(server: OpsServer) -> None:
    client = Client(server.address)
    rid = str(uuid.uuid4())
    try:
        lease = await lease_when_free(client, "adm")
        with pytest.raises(Outcome):
            await client.lease("full", reservation_id=rid, tag="queuer")
        # Independent commands: run them side by side (each is a Python start-up).
        (
            (rc, out, err),
            (rc2, out2, err2),
            (rc3, out3, err3),
            (rc4, out4, err4),
        ) = await asyncio.gather(
            run(server, "admin", "leases"),
            run(server, "admin", "leases", "drainme", "--output", "json"),
            run(server, "admin", "reservations", "full", "--output", "json"),
            run(server, "admin", "reservations"),
        )
        assert rc == 0, err
        # Text mode prints a table, not JSON.
        assert out.split()[:3] == ["INSTANCE", "POOL", "SERVICE-TAG"], out
        line = next(x for x in out.splitlines() if x.startswith(lease.instance))
        assert line.split()[1:3] == ["adm", "ops"], line
        assert rc2 == 0, err2
        assert all(x["pool"] == "drainme" for x in json.loads(out2))
        assert rc3 == 0, err3
        queue = json.loads(out3)
        assert [x["position"] for x in queue] == list(range(1, len(queue) + 1)), queue
        mine = [x for x in queue if x["id"] == rid]
        assert len(mine) == 1, out3
        tag = mine[0].get("serviceTag", mine[0].get("service_tag"))
        # The newest reservation is last in the queue.
        assert mine[0]["pool"] == "full" and tag == "queuer", mine
        assert mine[0]["position"] == len(queue), queue
        assert rc4 == 0 and any(x.startswith(rid) for x in out4.splitlines()), (out4, err4)
        assert not out4.lstrip().startswith(("[", "{")), out4
    finally:
        await client.return_(lease.instance)
        client.close()
