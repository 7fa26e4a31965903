"""The load generator: a separate process, one asyncio loop, N concurrent workers.

It reads one JSON command per line on stdin and answers one JSON line on stdout,
so the orchestrator (tests.bench.__main__) pays Python's start-up once. Calls go
through the generated grpclib stubs (vmpool.proto), like any Python client.

Commands (``op``):
- ``ping``:    workers call Ping in a loop.
- ``lease``:   workers loop Lease -> Return (no reservation id).
- ``handoff``: workers loop Lease(reservation_id, x-vmpool-wait) -> read the
               instance's ready_at from the database -> Return.
- ``quit``.

Latencies are measured around each stub call (``time.perf_counter``); only calls
that start after ``warmup`` seconds and end inside the ``duration`` window count.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api

TAG = "bench"
CALL_TIMEOUT = 30.0
CYCLE = "cycle"  # Lease + Return, timed from the Lease's start to the Return's end


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds (nearest-rank) of latencies in seconds."""
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        i = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
        return round(ordered[i] * 1000, 3)

    return {
        "p50_ms": rank(0.50),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


class Window:
    """Collects (start, end) of calls per kind; keeps those inside the window."""

    def __init__(self, warmup: float, duration: float) -> None:
        now = time.perf_counter()
        self.start = now + warmup
        self.end = self.start + duration
        self.latencies: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}

    def done(self) -> bool:
        return time.perf_counter() >= self.end

    def record(self, kind: str, t0: float, t1: float) -> None:
        if t0 >= self.start and t1 <= self.end:
            self.latencies.setdefault(kind, []).append(t1 - t0)

    def error(self, kind: str, t0: float, err: GRPCError) -> None:
        if t0 >= self.start and t0 <= self.end:
            key = f"{kind}:{err.status.name}"
            self.errors[key] = self.errors.get(key, 0) + 1

    def summary(self, duration: float) -> dict[str, Any]:
        out: dict[str, Any] = {"errors": self.errors}
        total = 0
        for kind, lats in self.latencies.items():
            if kind != CYCLE:  # a cycle is a Lease and a Return, counted already
                total += len(lats)
            out[kind] = {
                "calls": len(lats),
                "calls_per_s": round(len(lats) / duration, 1),
                **percentiles(lats),
            }
        out["calls_per_s"] = round(total / duration, 1)
        return out


async def _ping_worker(stub: api.VmPoolLeaseServiceStub, w: Window) -> None:
    while not w.done():
        t0 = time.perf_counter()
        try:
            await stub.ping(Empty(), timeout=CALL_TIMEOUT)
        except GRPCError as err:
            w.error("ping", t0, err)
            continue
        w.record("ping", t0, time.perf_counter())


async def _lease_worker(stub: api.VmPoolLeaseServiceStub, w: Window, pool: str) -> None:
    while not w.done():
        t0 = time.perf_counter()
        try:
            reply = await stub.lease(
                api.LeaseRequest(pool=pool, service_tag=TAG), timeout=CALL_TIMEOUT
            )
        except GRPCError as err:
            w.error("lease", t0, err)
            await asyncio.sleep(0.005)  # the pool ran dry: do not spin on errors
            continue
        t1 = time.perf_counter()
        w.record("lease", t0, t1)
        try:
            await stub.return_(
                api.ReturnRequest(instance=reply.lease.instance, service_tag=TAG),
                timeout=CALL_TIMEOUT,
            )
        except GRPCError as err:
            w.error("return", t1, err)
            continue
        t2 = time.perf_counter()
        w.record("return", t1, t2)
        w.record(CYCLE, t0, t2)


async def _handoff_worker(
    stub: api.VmPoolLeaseServiceStub,
    db: Any,
    pool: str,
    count: int,
    wait: str,
    samples: list[dict[str, Any]],
    errors: dict[str, int],
) -> None:
    for _ in range(count):
        rid = str(uuid.uuid4())
        t0 = time.perf_counter()
        try:
            reply = await stub.lease(
                api.LeaseRequest(pool=pool, service_tag=TAG, reservation_id=rid),
                timeout=CALL_TIMEOUT,
                metadata={"x-vmpool-wait": wait},
            )
        except GRPCError as err:
            errors[err.status.name] = errors.get(err.status.name, 0) + 1
            continue
        returned = datetime.now(UTC)
        call = time.perf_counter() - t0
        instance = reply.lease.instance
        ready_at = await db.fetchval("SELECT ready_at FROM instances WHERE name = $1", instance)
        samples.append(
            {
                "instance": instance,
                "lease_call_s": call,
                "ready_to_return_s": (returned - ready_at).total_seconds() if ready_at else None,
            }
        )
        await stub.return_(
            api.ReturnRequest(instance=instance, service_tag=TAG), timeout=CALL_TIMEOUT
        )


def _channels(address: str, n: int) -> list[Channel]:
    host, _, port = address.rpartition(":")
    return [Channel(host, int(port)) for _ in range(n)]


async def run(cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    concurrency = int(cmd.get("concurrency", 1))
    channels = _channels(cmd["address"], max(1, min(concurrency, int(cmd.get("channels", 8)))))
    stubs = [api.VmPoolLeaseServiceStub(ch) for ch in channels]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        if op == "handoff":
            import asyncpg

            db = await asyncpg.create_pool(cmd["database_url"], min_size=1, max_size=concurrency)
            samples: list[dict[str, Any]] = []
            errors: dict[str, int] = {}
            per = max(1, int(cmd["count"]) // concurrency)
            try:
                await asyncio.gather(
                    *(
                        _handoff_worker(
                            stubs[i % len(stubs)],
                            db,
                            cmd["pool"],
                            per,
                            cmd.get("wait", "10s"),
                            samples,
                            errors,
                        )
                        for i in range(concurrency)
                    )
                )
            finally:
                await db.close()
            out: dict[str, Any] = {"samples": samples, "errors": errors}
        else:
            w = Window(float(cmd.get("warmup", 0.5)), float(cmd["duration"]))
            if op == "ping":
                workers = [_ping_worker(stubs[i % len(stubs)], w) for i in range(concurrency)]
            elif op == "lease":
                workers = [
                    _lease_worker(stubs[i % len(stubs)], w, cmd["pool"]) for i in range(concurrency)
                ]
            else:
                raise ValueError(f"unknown op {op!r}")
            await asyncio.gather(*workers)
            out = w.summary(float(cmd["duration"]))
    finally:
        for ch in channels:
            ch.close()
    wall = time.perf_counter() - wall0
    out["client_cpu_percent"] = round(100 * (time.process_time() - cpu0) / wall, 1)
    return out


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            result = asyncio.run(run(cmd))
        except Exception as err:  # reported to the orchestrator, which decides
            result = {"failed": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
