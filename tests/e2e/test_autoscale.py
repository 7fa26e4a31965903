"""Adaptive warm pools through `vmpool serve` (issue 24): a short burst of Lease
calls from a gRPC client raises the pool's desired buffer S while it is still
arriving; S falls only after scale_down_delay; `vmpool status` shows it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
from grpclib.client import Channel

from tests.e2e.clients import Client, RpcError
from tests.e2e.conftest import Running
from tests.polling import eventually
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
        "window": "8s",
    },
}


async def desired(stub: adm.VmPoolAdminServiceStub) -> tuple[int, str]:
    reply = await stub.pool_stats(adm.PoolStatsRequest(), timeout=5)
    (pool,) = [p for p in reply.pools if p.name == "auto"]
    return pool.autoscale.desired_ready, pool.autoscale.reason


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
        leased: list[str] = []
        seen_during: list[int] = []
        for i in range(16):
            try:
                leased.append((await client.lease("auto")).instance)
            except RpcError as err:
                assert err.code == "RESOURCE_EXHAUSTED"
            if i >= 8:
                seen_during.append((await desired(stub))[0])
            await asyncio.sleep(0.25)  # the trace's pacing, not a wait for a condition
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
        top, _ = await desired(stub)
        raised = time.monotonic()
        history: list[tuple[float, int]] = []

        async def probe() -> int:
            nonlocal top, raised
            s, _ = await desired(stub)
            if s > top:
                top, raised = s, time.monotonic()
            history.append((time.monotonic() - raised, s))
            return s

        await eventually(probe, lambda s: s <= 1, 45, "S back at the floor", interval=0.2)
        fell = [age for age, s in history if s < top]
        assert fell and min(fell) >= DELAY - 1.0, history  # not before the delay
        rows = await server.sql(
            "SELECT count(*) AS n FROM instances WHERE pool = 'auto' AND state <> 'destroying'"
        )
        assert rows[0]["n"] <= 30
        server.assert_clean_log()
    finally:
        channel.close()
