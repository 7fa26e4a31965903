"""The shutdown gate: once draining, new calls get UNAVAILABLE; calls in flight finish."""

from __future__ import annotations

import asyncio

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmpool.api.rpc import Gate


async def test_drain_refuses_new_calls_with_unavailable_and_waits_for_those_running() -> None:
    gate = Gate()
    gate.enter()
    drained = asyncio.create_task(gate.drain(timeout=30))
    await asyncio.sleep(0)
    with pytest.raises(GRPCError) as refused:
        gate.enter()
    assert refused.value.status is Status.UNAVAILABLE
    assert "shutting down" in (refused.value.message or "")
    assert not drained.done()  # the call in flight still runs
    gate.leave()
    assert await drained is True
    assert gate.in_flight == 0


async def test_drain_with_no_calls_returns_at_once() -> None:
    assert await Gate().drain(timeout=30) is True


async def test_drain_reports_calls_still_running_when_time_runs_out() -> None:
    gate = Gate()
    gate.enter()
    assert await gate.drain(timeout=0.01) is False
    assert gate.in_flight == 1
    gate.leave()
    assert await gate.drain(timeout=30) is True
