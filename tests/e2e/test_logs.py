"""`vmpool serve`'s stdout as operators see it: every line one JSON record while
the serving thread and the background thread both log, with PYTHONUNBUFFERED=1;
and `vmpool serve | head -1` (stdout closed early) keeps serving."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from tests.e2e.clients import Client, RpcError
from tests.e2e.conftest import server_config
from tests.pg import TestPostgres
from tests.server import ServerProcess, json_records

# Small pools that churn: every Return destroys a VM and the reconciler (the
# background thread) provisions another, logging each step.
POOLS = [{"name": "churn", "min_ready": 4, "max_size": 8}]


def start(workdir: Path, url: str) -> ServerProcess:
    proc = ServerProcess(
        server_config(POOLS),
        workdir,
        database_url=url,
        name="logs",
        env={"PYTHONUNBUFFERED": "1"},
    )
    return proc.start(stdout=subprocess.PIPE)


async def churn(client: Client, seconds: float) -> int:
    """Lease and return as fast as possible from a few callers; how many leases."""
    leased = 0
    deadline = asyncio.get_running_loop().time() + seconds

    async def one() -> None:
        nonlocal leased
        while asyncio.get_running_loop().time() < deadline:
            try:
                lease = await client.lease("churn")
            except RpcError:
                await asyncio.sleep(0.01)
                continue
            leased += 1
            await client.return_(lease.instance)

    await asyncio.gather(*(one() for _ in range(4)))
    return leased


async def test_every_stdout_line_is_one_json_record_under_both_threads(
    postgres: TestPostgres,
    tmp_path: Path,
    client_factory: Callable[[str, str], Client],
) -> None:
    proc = await asyncio.to_thread(start, tmp_path, await postgres.fresh())
    assert proc.proc is not None and proc.proc.stdout is not None
    stdout = proc.proc.stdout
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(stdout), daemon=True)
    reader.start()
    try:
        client = client_factory("grpcio", proc.address)
        assert await churn(client, 4.0) > 20
    finally:
        assert await asyncio.to_thread(proc.terminate, 30) == 0
        await asyncio.to_thread(reader.join, 10)
    records = json_records(lines)
    events = {r["event"] for r in records}
    assert "rpc" in events, "the serving thread's lines"
    background = {r["event"] for r in records if r.get("pool") == "churn" and r["event"] != "rpc"}
    assert background, "the background thread's lines"


async def test_a_closed_stdout_does_not_stop_or_wedge_the_server(
    postgres: TestPostgres, tmp_path: Path, client_factory: Callable[[str, str], Client]
) -> None:
    """`vmpool serve | head -1`: the reader goes away after one line."""
    proc = await asyncio.to_thread(start, tmp_path, await postgres.fresh())
    assert proc.proc is not None and proc.proc.stdout is not None
    first = await asyncio.to_thread(proc.proc.stdout.readline)
    proc.proc.stdout.close()
    assert json.loads(first)
    client = client_factory("grpcio", proc.address)
    assert await churn(client, 2.0) > 5, "the server kept leasing with nobody reading its log"
    assert await client.ping() == "pong"
    assert proc.proc.poll() is None, "the server exited"
    assert await asyncio.to_thread(proc.terminate, 30) == 0
    stderr = proc.log()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr[-3000:]
