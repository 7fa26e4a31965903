"""`vmpool lease --wait`: one reservation id, retried until a VM is ours or time runs out."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import TextIO

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmpool.cli_connection import Connection
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api

WAIT_STEP = 20.0  # seconds of server-side wait per Lease call while --wait runs


async def lease_with_wait(
    conn: Connection,
    *,
    pool: str,
    service_tag: str,
    duration: timedelta | None,
    reservation_id: str | None,
    wait: timedelta,
    progress: TextIO,
) -> api.Lease:
    deadline = time.monotonic() + wait.total_seconds()
    calls = 0
    while True:
        step = max(0.0, min(WAIT_STEP, deadline - time.monotonic())) if calls else 0.0
        calls += 1
        metadata = {"x-vmpool-wait": f"{step:.0f}s"} if step >= 1 else None
        request = api.LeaseRequest(
            pool=pool, service_tag=service_tag, reservation_id=reservation_id
        )
        if duration is not None:
            request.expires = datetime.now(UTC) + duration
        try:
            reply = await conn.lease.lease(
                request, timeout=conn.timeout + step, metadata=conn.call_metadata(metadata)
            )
        except GRPCError as err:
            retry = err.status in (Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE)
            if not wait or not retry or time.monotonic() >= deadline:
                raise
            print(f"waiting: {err.message}", file=progress, flush=True)
            if step < 1:
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            continue
        return reply.lease
