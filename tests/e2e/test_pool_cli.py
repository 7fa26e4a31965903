"""`vmpool pool ...` and the ad-hoc `vmpool lease --runtime` against a real server,
run as the console command (pool-api.md section 8)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.e2e.conftest import Running
from tests.polling import eventually
from vmpool.cli.ad_hoc import ad_hoc_pool_name
from vmpool.cli.output import go_time

EXTRA = {
    "tiers": [{"name": "cold", "description": "nothing warm", "min_ready": 0, "max_size": 2}],
    "versions": {"runtime": "intrinsic.platform.20261201.RC00", "intrinsic_os": "20261201.RC00"},
}


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[Running]]) -> AsyncIterator[Running]:
    running = await start_server(
        [{"name": "cfg", "min_ready": 1, "max_size": 1}], name="poolcli", **EXTRA
    )
    yield running
    running.assert_clean_log()


def cmd(server: Running, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmpool", *args, "--server", server.address]


async def vmpool(
    server: Running, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        cmd(server, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def name() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


async def pools_json(server: Running) -> dict[str, Any]:
    r = await vmpool(server, "pool", "list", "--output", "json")
    assert r.returncode == 0, r.stderr
    return {p["name"]: p for p in json.loads(r.stdout)}


async def test_create_wait_list_describe_update_delete(server: Running) -> None:
    n = name()
    r = await vmpool(server, "pool", "create", "--pool", n, "--wait-timeout", "30s")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("VM pool created.\n")
    assert f'name: "{n}"' in r.stdout and 'runtime: "intrinsic.platform.20261201.RC00"' in r.stdout
    assert "spec {" in r.stdout and f"VM pool '{n}' is ready." in r.stdout

    r = await vmpool(server, "pool", "list")
    header, *rows = r.stdout.splitlines()
    assert header.split("\t") == [
        "idx",
        "name",
        "current_status",
        "desired_status",
        "runtime",
        "intrinsic_os",
        "hardware_template",
        "tier",
    ]
    mine = [row.split("\t") for row in rows if row.split("\t")[1] == n]
    assert mine and mine[0][2:4] == ["RUNNING", "RUNNING"] and mine[0][7] == "ad_hoc_single"

    r = await vmpool(server, "pool", "describe", "--pool", n, "--output", "json")
    described = json.loads(r.stdout)
    assert described["spec"]["pool_tier"] == "ad_hoc_single" and described["reconciling"] is False

    r = await vmpool(server, "pool", "update", "--pool", n)  # no flag: present-but-empty mask
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("VM pool updated.") and 'pool_tier: "ad_hoc_single"' in r.stdout
    r = await vmpool(
        server, "pool", "update", "--pool", n, "--tier", "cold", "--wait-timeout", "30s"
    )
    assert r.returncode == 0, r.stderr
    assert (await pools_json(server))[n]["tier"] == "cold"

    r = await vmpool(server, "pool", "delete", "--pool", n, "--wait-timeout", "30s")
    assert r.returncode == 0, r.stderr
    assert "VM pool will converge to deletion." in r.stdout
    assert f"VM pool '{n}' has been deleted." in r.stdout
    assert n not in await pools_json(server)


async def test_catalogs_and_state_commands(server: Running) -> None:
    r = await vmpool(server, "pool", "list-tiers")
    assert r.stdout.splitlines()[0] == "idx\tname\tdescription"
    assert "1\tad_hoc_single\tOne VM, made on demand" in r.stdout
    r = await vmpool(server, "pool", "list-hwtemplates", "--output", "json")
    assert json.loads(r.stdout)[0]["name"] == "default"
    for command, text, status in (
        ("pause", "VM pool will pause.", "PAUSED"),
        ("resume", "VM pool resumed.", "RUNNING"),
        ("stop", "VM pool will stop.", "STOPPED"),
        ("resume", "VM pool resumed.", "RUNNING"),
    ):
        r = await vmpool(server, "pool", command, "--pool", "cfg")
        assert (r.returncode, r.stdout.strip()) == (0, text), r.stderr
        assert (await pools_json(server))["cfg"]["desired_status"] == status
    r = await vmpool(server, "pool", "describe", "--pool", "nope")
    assert r.returncode == 4 and "not found" in r.stderr
    r = await vmpool(server, "pool", "delete", "--pool", "cfg")
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr
    r = await vmpool(server, "pool", "create", "--pool", "bad name")
    assert r.returncode == 2 and "INVALID_ARGUMENT" in r.stderr and "name" in r.stderr


async def test_leases_list_and_stop(server: Running) -> None:
    n = name()
    assert (
        await vmpool(server, "pool", "create", "--pool", n, "--wait-timeout", "30s")
    ).returncode == 0
    r = await vmpool(server, "lease", "--pool", n, "--service-tag", "someone", "--output", "json")
    assert r.returncode == 0, r.stderr
    instance = json.loads(r.stdout)["instance"]
    r = await vmpool(server, "pool", "leases", "list", "--pool", n)
    header, row = r.stdout.splitlines()
    assert header == "idx\tname\tpool\texpires"
    assert row.startswith(f"0\t{instance}\t{n}\t") and row.endswith(" +0000 UTC")
    r = await vmpool(server, "pool", "leases", "stop", "--lease", instance)
    assert (r.returncode, r.stdout.strip()) == (0, f"VM lease {instance} will stop."), r.stderr
    r = await vmpool(server, "pool", "leases", "list", "--pool", n, "--output", "json")
    assert json.loads(r.stdout) == []
    await vmpool(server, "pool", "delete", "--pool", n)


async def test_ad_hoc_lease_creates_leases_and_deletes_its_pool(server: Running) -> None:
    r = await vmpool(
        server, "lease", "--runtime", "intrinsic.platform.20261111.RC01", "--output", "json"
    )
    assert r.returncode == 0, r.stderr
    lease = json.loads(r.stdout)
    assert lease["pool"].startswith("adhoc-lease-")
    # Connection details as a plain `vmpool lease` gives them (the fake provider's address).
    assert lease["addresses"] and lease["owner"] and lease["leased_at"], lease
    assert "Cleaned up temporary pool" in r.stderr
    # The pool is deleting (it disappears once the VM is gone); the lease works.
    listed = await pools_json(server)
    assert lease["pool"] not in listed or listed[lease["pool"]]["desired_status"] == "DELETED"
    r = await vmpool(server, "get", lease["instance"], "--output", "json")
    assert r.returncode == 0, r.stderr
    r = await vmpool(server, "return", lease["instance"])
    assert r.returncode == 0, r.stderr

    async def gone() -> bool:
        return lease["pool"] not in await pools_json(server)

    await eventually(gone, bool, 20, "the ad-hoc pool gone")


async def test_ad_hoc_pool_is_deleted_on_ctrl_c(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    # An ad_hoc_single tier that never makes a VM: the lease waits until Ctrl-C.
    never = {"tiers": [{"name": "ad_hoc_single", "min_ready": 0, "max_size": 0}]}
    server = await start_server([], name="poolcli-never", **never)
    proc = await asyncio.to_thread(
        subprocess.Popen,
        cmd(server, "lease", "--intrinsic-os", "20261111.RC01", "--wait", "10m"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    async def created() -> list[str]:
        return [p for p in await pools_json(server) if p.startswith("adhoc-lease-")]

    ours = await eventually(created, bool, 20, "the ad-hoc pool created")
    await asyncio.sleep(1.0)  # it is retrying its Lease now
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGINT)
    _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 130, err
    assert "Cleaned up temporary pool" in err, err

    async def gone() -> bool:
        return not set(ours) & set(await pools_json(server))

    await eventually(gone, bool, 20, "the ad-hoc pool deleted after Ctrl-C")


def test_ad_hoc_pool_names_follow_inctl() -> None:
    xid = "c0ffee0123456789abcd"
    assert ad_hoc_pool_name("max.mustermann@intrinsic.ai", xid) == (
        f"adhoc-lease-max-mustermann-intrinsic-ai-{xid}"
    )
    assert ad_hoc_pool_name("DOMAIN\\User", xid) == f"adhoc-lease-DOMAIN-User-{xid}"
    assert ad_hoc_pool_name("Jürgen", xid) == f"adhoc-lease-Jürgen-{xid}"
    assert ad_hoc_pool_name(None, xid) == f"adhoc-lease-{xid}"
    assert len(ad_hoc_pool_name("x" * 300, xid)) <= 128


def test_go_time_format() -> None:
    from datetime import UTC, datetime

    assert go_time(datetime(2026, 8, 22, 10, 0, tzinfo=UTC)) == "2026-08-22 10:00:00 +0000 UTC"
    assert go_time(datetime(2026, 8, 22, 10, 0, 0, 500000, tzinfo=UTC)) == (
        "2026-08-22 10:00:00.5 +0000 UTC"
    )


async def test_status_shows_api_pools_with_their_tier_sizing(server: Running) -> None:
    n = name()
    assert (await vmpool(server, "pool", "create", "--pool", n, "--tier", "cold")).returncode == 0
    r = await vmpool(server, "status", "--output", "json")
    assert r.returncode == 0, r.stderr
    row = next(p for p in json.loads(r.stdout) if p["name"] == n)
    assert (row["configured"], row["min_ready"], row["max_size"]) == (True, 0, 2)
    await vmpool(server, "pool", "delete", "--pool", n)
