"""Adaptive warm pools through `vmpool serve` (issue 24): a short burst of Lease
calls from a gRPC client raises the pool's desired buffer S while it is still
arriving; S falls only after scale_down_delay; `vmpool status` shows it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest
from grpclib.client import Channel

from tests.e2e.clients import Client, RpcError
from tests.e2e.conftest import Running
from tests.ops.conftest import ascrape, sample
from tests.polling import eventually
from tests.server import json_records
from vmpool.domain.autoscale import PROFILE_DAYS
from vmpool.proto.vmpool.admin import v1 as adm

DELAY = 6.0  # scale_down_delay, seconds
POOL = {
    "name": "auto",
    "min_ready": 0,
    "max_size": 30,
    "max_provisioning": 30,
    "autoscale": {
        "floor": 1,
        "ceiling": 30,
        "scale_down_delay": f"{DELAY:g}s",
        "learn_daily": True,
        "period": "60s",
        "bin": "5s",
        "window": "5s",
    },
}


async def desired_of(stub: adm.VmPoolAdminServiceStub, name: str) -> tuple[int, str]:
    reply = await stub.pool_stats(adm.PoolStatsRequest(), timeout=5)
    (pool,) = [p for p in reply.pools if p.name == name]
    return pool.autoscale.desired_ready, pool.autoscale.reason


async def desired(stub: adm.VmPoolAdminServiceStub) -> tuple[int, str]:
    return await desired_of(stub, "auto")


@pytest.mark.asyncio
async def test_a_burst_raises_s_while_it_arrives_and_s_falls_after_the_delay(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
) -> None:
    server = await start_server(
        [POOL], provider={"kind": "fake", "fake": {"boot_seconds": 2}}, name="autoscale"
    )
    host, port = server.address.rsplit(":", 1)
    channel = Channel(host, int(port))
    stub = adm.VmPoolAdminServiceStub(channel)
    client = client_factory("grpclib", server.address)
    try:
        await eventually(lambda: desired(stub), lambda d: d[0] == 1, 20, "S at the floor")
        await server.wait_ready("auto", 1, timeout=20)

        # 16 Lease calls over 4 s: served from the buffer or refused, all counted.
        # Each starts on the trace's schedule, however long the ones before took
        # (one after another, a loaded machine stretched the burst and its rate).
        leased: list[str] = []
        seen_during: list[int] = []

        async def one(i: int) -> None:
            await asyncio.sleep(i * 0.25)  # the trace's pacing, not a wait for a condition
            try:
                leased.append((await client.lease("auto")).instance)
            except RpcError as err:
                assert err.code == "RESOURCE_EXHAUSTED"

        calls = [asyncio.create_task(one(i)) for i in range(16)]
        await asyncio.sleep(8 * 0.25)  # from the ninth call on
        while not all(c.done() for c in calls):
            seen_during.append((await desired(stub))[0])
            await asyncio.sleep(0.25)
        await asyncio.gather(*calls)
        assert max(seen_during) >= 6, seen_during  # S rose before the burst was over

        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "vmpool", "status", "--server", server.address],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert "AUTOSCALE" in status.stdout and "auto" in status.stdout, status.stdout
        for instance in leased:
            await client.return_(instance)

        # S holds for the delay after its last rise, then falls back to the floor.
        await eventually(
            lambda: desired(stub), lambda d: d[0] <= 1, 45, "S back at the floor", interval=0.2
        )
        changes = [
            (datetime.fromisoformat(r["timestamp"]), r["desired_ready"], r["previous"])
            for r in json_records(server.proc.log().splitlines())
            if r.get("event") == "desired ready changed" and r.get("pool") == "auto"
        ]
        rises = [at for at, s, before in changes if before is not None and s > before]
        falls = [at for at, s, before in changes if before is not None and s < before]
        assert rises and falls, changes
        first_fall = min(falls)
        last_rise = max(at for at in rises if at < first_fall)
        assert (first_fall - last_rise).total_seconds() >= DELAY - 0.5, changes
        rows = await server.sql(
            "SELECT count(*) AS n FROM instances WHERE pool = 'auto' AND state <> 'destroying'"
        )
        assert rows[0]["n"] <= 30
        server.assert_clean_log()
    finally:
        channel.close()


PERIOD = 15.0
AT = 8.0  # the burst's offset in each period
PERIODIC = {
    **POOL,
    "name": "daily",
    "autoscale": {
        "floor": 1,
        "ceiling": 30,
        "scale_down_delay": "3s",
        "period": f"{PERIOD:g}s",
        "bin": "5s",
        "window": "6s",
    },
}


async def burst(client: Client, metrics_port: int, n: int = 10) -> tuple[int, list[str]]:
    """``n`` Lease calls within a second, each with a fresh reservation and
    x-vmpool-wait; how many waited over 0.5 s for an instance, and the instances.
    The wait is the server's (vmpool_lease_wait_seconds: time queued with no
    instance to give), not what the client saw: on a loaded machine a Lease served
    from the buffer can take the client over 0.5 s."""
    before = await ascrape(metrics_port)

    async def one(delay: float) -> str:
        await asyncio.sleep(delay)  # the trace's pacing
        lease = await client.lease("daily", reservation_id=str(uuid.uuid4()), wait="20s")
        return str(lease.instance)

    names = await asyncio.gather(*(one(i / n) for i in range(n)))
    # A call's wait is observed as it ends (with its latency): wait for all n.
    await eventually(
        lambda: ascrape(metrics_port),
        lambda f: delta(before, f, "vmpool_rpc_duration_seconds_count", method="Lease") >= n,
        30,
        f"the {n} Lease calls in the server's metrics",
    )
    after = await ascrape(metrics_port)
    waited = delta(before, after, "vmpool_lease_wait_seconds_count") - delta(
        before, after, "vmpool_lease_wait_seconds_bucket", le="0.5"
    )
    return round(waited), list(names)


def delta(before: dict[str, Any], after: dict[str, Any], name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


async def until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.time()))  # the trace's clock (UTC period)


LEAD = 12.0  # from the new leader's start to the third burst: leadership, the profile, boots


@pytest.mark.asyncio
@pytest.mark.timeout(300)  # up to PROFILE_DAYS periods of 15 s, on a loaded machine
async def test_a_periodic_burst_is_served_from_its_third_time_across_a_leader_restart(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
) -> None:
    provider = {"kind": "fake", "fake": {"boot_seconds": 2}}
    first = await start_server([PERIODIC], provider=provider, name="periodic")
    client = client_factory("grpclib", first.address)
    await first.wait_ready("daily", 1, timeout=20)
    start = ((time.time() + 3 - AT) // PERIOD + 1) * PERIOD  # the first burst 3 s away or more
    waited = []
    for k in range(2):  # the pool learns: these bursts mostly wait a boot time
        await until(start + k * PERIOD + AT)
        n, names = await burst(client, first.proc.metrics_port)
        waited.append(n)
        for name in names:
            await client.return_(name)
    assert min(waited) >= 5, waited  # nothing was booted ahead of them
    # A new leader: the first server stops, another starts on the same database.
    await asyncio.to_thread(first.proc.terminate)
    second = await start_server([PERIODIC], provider=provider, db_url=first.db_url, name="p2")
    # The third burst: the first period from the third on that leaves the new leader
    # LEAD seconds, however long the restart took on a loaded machine. A period
    # without a burst teaches nothing away: the profile is the second largest peak
    # of the last PROFILE_DAYS periods.
    k = 2
    while start + k * PERIOD + AT - time.time() < LEAD:
        k += 1
    assert k < PROFILE_DAYS, f"the restart took {k - 1} periods"
    third = start + k * PERIOD + AT
    client = client_factory("grpclib", second.address)
    host, port = second.address.rsplit(":", 1)
    channel = Channel(host, int(port))
    try:
        # Booted ahead from the stored profile (not left over from the last burst).
        ahead = await eventually(
            lambda: desired_of(adm.VmPoolAdminServiceStub(channel), "daily"),
            lambda d: d[1] == "profile" and d[0] >= 8,
            third - time.time(),
            "S raised by the profile before the third burst",
            interval=0.2,
        )
    finally:
        channel.close()
    assert time.time() < third, ahead
    await until(third)
    n, names = await burst(client, second.proc.metrics_port)
    assert n <= 1, f"{n} of 10 waited on the third burst (learned: {waited} waited before)"
    second.assert_clean_log()
