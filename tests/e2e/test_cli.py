"""A tour of the `vmpool` client commands against a running server, as a person or a
script would use them (spec section 8)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.e2e.clients import Client
from tests.e2e.conftest import Running

POOLS = [
    {"name": "alpha", "min_ready": 2, "max_size": 4, "labels": {"size": "small", "os": "cirros"}},
    {"name": "solo", "min_ready": 1, "max_size": 1},
]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[Running]]) -> AsyncIterator[Running]:
    running = await start_server(POOLS, name="cli")
    await running.wait_ready("alpha", 2)
    yield running
    running.assert_clean_log()


def vmpool(server: Running, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vmpool",
            *args,
            "--server",
            server.address,
            "--service-tag",
            "cli-tour",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {result.stdout!r}"
    return json.loads(lines[0])


def expires(lease: dict[str, str]) -> datetime:
    assert RFC3339.match(lease["expires"]), lease["expires"]
    return datetime.fromisoformat(lease["expires"].replace("Z", "+00:00"))


def near(a: datetime, b: datetime, seconds: float = 10) -> bool:
    return abs((a - b).total_seconds()) <= seconds


async def test_cli_tour(server: Running) -> None:
    ping = vmpool(server, "ping")
    assert ping.returncode == 0 and ping.stdout.strip() == "pong", ping

    assert ok_json(vmpool(server, "pools", "--output", "json")) == [
        {"name": "alpha", "labels": {"os": "cirros", "size": "small"}},
        {"name": "solo", "labels": {}},
    ]

    lease = ok_json(vmpool(server, "lease", "--pool", "alpha", "--output", "json"))
    assert set(lease) == {
        *("instance", "pool", "expires", "zone"),  # the lease API's Lease
        *("addresses", "node", "phase", "leased_at", "owner", "reservation_id"),  # DescribeInstance
    }
    assert lease["instance"].startswith("vmp-") and lease["pool"] == "alpha" and lease["zone"]
    # Something to connect to: the fake provider's made-up address, node and phase.
    assert len(lease["addresses"]) == 1 and lease["addresses"][0].startswith("10."), lease
    assert lease["node"].startswith("fake-node-") and lease["phase"] == "Running", lease
    assert lease["owner"] == "cli-tour" and near(
        datetime.fromisoformat(lease["leased_at"].replace("Z", "+00:00")), datetime.now(UTC)
    )
    assert near(expires(lease), datetime.now(UTC) + timedelta(minutes=30))
    name = lease["instance"]

    assert ok_json(vmpool(server, "get", name, "--output", "json")) == lease
    text = vmpool(server, "get", name)
    assert text.returncode == 0 and name in text.stdout and "alpha" in text.stdout
    assert f"address={lease['addresses'][0]}" in text.stdout, text.stdout
    assert f"node={lease['node']}" in text.stdout and "phase=Running" in text.stdout

    longer = ok_json(vmpool(server, "extend", name, "2h", "--output", "json"))
    assert near(expires(longer), datetime.now(UTC) + timedelta(hours=2))
    kept = ok_json(vmpool(server, "extend", name, "10m", "--extend-only", "--output", "json"))
    assert kept == longer, "--extend-only never shortens"
    noted = vmpool(server, "extend", name, "10m", "--extend-only")
    assert noted.returncode == 0 and "not the" in noted.stderr, "the CLI warns like inctl"

    intruder = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmpool",
            "return",
            name,
            "--server",
            server.address,
            "--service-tag",
            "someone-else",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert intruder.returncode == 5 and "PERMISSION_DENIED" in intruder.stderr, intruder

    returned = vmpool(server, "return", name, "--output", "json")
    assert returned.returncode == 0, returned.stderr
    gone = vmpool(server, "get", name)
    assert gone.returncode == 4 and "NOT_FOUND" in gone.stderr and name in gone.stderr, gone

    timed = ok_json(
        vmpool(server, "lease", "--pool", "alpha", "--duration", "1h", "--output", "json")
    )
    assert near(expires(timed), datetime.now(UTC) + timedelta(hours=1))
    assert timed["instance"] != name, "a returned instance is never handed out again"
    assert vmpool(server, "return", timed["instance"]).returncode == 0

    missing = vmpool(server, "lease", "--pool", "nope")
    assert missing.returncode == 4 and "NOT_FOUND" in missing.stderr and "nope" in missing.stderr


async def test_cli_lease_wait_shows_queue_position_and_gets_the_next_instance(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    await server.wait_ready("solo", 1)
    blocker = await client.lease("solo")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmpool",
        "lease",
        "--pool",
        "solo",
        "--wait",
        "60s",
        "--output",
        "json",
        "--server",
        server.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        # The line comes while the CLI waits: nothing is free until the blocker
        # is returned below. (Budgets are generous: the CLI's start-up alone
        # takes seconds on a loaded machine.)
        line = json.loads(await asyncio.wait_for(proc.stderr.readline(), 30))
        assert line["event"] == "waiting", line
        assert "position" in line, line
        assert (line["position"], line["length"], line["pool"]) == (1, 1, "solo"), line
        assert re.search(r'queued at position 1 of 1 in pool "solo"', line["state"]), line
        assert proc.returncode is None
        await client.return_(blocker.instance)
        out, err = await asyncio.wait_for(proc.communicate(), 50)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    lease = json.loads(out.decode())
    assert lease["pool"] == "solo" and lease["instance"] != blocker.instance
    await client.return_(lease["instance"], "vmpool-cli")


def tagged(server: Running, tag: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmpool", *args, "--server", server.address, "--service-tag", tag],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_cli_with_the_empty_service_tag(server: Running) -> None:
    """`--service-tag ""` is today's public inctl's tag: a tag like any other."""
    lease = ok_json(tagged(server, "", "lease", "--pool", "alpha", "--output", "json"))
    name = lease["instance"]
    other = tagged(server, "inctl", "return", name)
    assert other.returncode != 0 and "PERMISSION_DENIED" in other.stderr, other
    extended = tagged(server, "", "extend", name, "1h", "--output", "json")
    assert extended.returncode == 0, extended.stderr
    assert tagged(server, "", "return", name).returncode == 0


def test_a_reader_that_leaves_early_is_not_an_unreachable_server(server: Running) -> None:
    # `vmpool admin leases | head -1`: stdout's reader has gone when the table is
    # printed. That is no "cannot reach the server" (exit 6), and no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vmpool", "pools", "--server", server.address],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")
