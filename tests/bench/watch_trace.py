"""`python -m tests.bench.watch_trace [--concurrency 2] [--seconds 8]`: where an
event's commit-to-client latency goes (issue 20, item 6).

The server runs with timestamps along each event's way (installed through
tests/bench/tracehook, nothing in vmpool changes): the trigger's clock
(``at``, the event's time), the Lease/Return answer's poke of the reader (just
after the commit), the reader's fetch that returned the event (its start and
end), and the stream's send (before and after its write). One watcher process
(raw decoding, as in ``--watch``) records when each event arrived while the
load generator runs Lease+Return with ``--concurrency`` workers. Printed:
percentiles of each leg, and the slowest events' legs.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg

ENV = "VMPOOL_BENCH_TRACE"
LEGS = ("total", "server", "commit", "to_fetch", "fetch", "to_send", "send", "client")


def install() -> None:
    """In the server: append one JSON line per mark to $VMPOOL_BENCH_TRACE."""
    path = os.environ.get(ENV)
    if not path:
        return
    from vmpool.api import watch
    from vmpool.services import lease_events

    out = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)

    def mark(kind: str, **fields: Any) -> None:
        out.write(json.dumps({"k": kind, "t": time.time(), **fields}) + "\n")

    poke = lease_events.EventHub.poke

    def traced_poke(self: Any) -> None:
        mark("poke")
        poke(self)

    fetch_new = vars(lease_events)["fetch_new"]

    async def traced_fetch(conn: Any, after: Any, limit: int) -> Any:
        began = time.time()
        batch = await fetch_new(conn, after, limit)
        mark("fetch", began=began, ev=[[e.pos, e.seq] for e in batch.events])
        return batch

    live: Callable[..., AsyncIterator[Any]] = watch.Watch._live

    async def traced_live(self: Any, sub: Any) -> AsyncIterator[Any]:
        async for item in live(self, sub):
            began = time.time()
            yield item
            mark("send", began=began, pos=sub.position.pos, seq=sub.position.seq)

    lease_events.EventHub.poke = traced_poke  # type: ignore[method-assign]
    vars(lease_events)["fetch_new"] = traced_fetch
    watch.Watch._live = traced_live  # type: ignore[method-assign]


async def _child(address: str, out: str, seconds: float) -> None:
    """One all-seeing stream: (cursor, type, event time, arrival) per message."""
    from grpclib.client import Channel

    from tests.bench.event_bytes import type_and_time
    from tests.bench.watch import RawReplies
    from vmpool.proto.vmpool.admin import v1 as adm
    from vmpool.wire.fastwire import fields

    host, port = address.rsplit(":", 1)
    channel = Channel(host, int(port), codec=RawReplies())
    stub = adm.VmPoolExtensionServiceStub(channel)
    rows: list[tuple[bytes, int, float, float]] = []

    async def follow() -> None:
        data: Any
        async for data in stub.watch_leases(adm.WatchLeasesRequest(expiring_lead_seconds=-1)):
            arrived = time.time()
            kind, at = type_and_time(data)
            rows.append((data, kind, at, arrived))

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(follow(), seconds)
    channel.close()
    with open(out, "w") as f:
        for data, kind, at, arrived in rows:
            _, _, start, end = next(x for x in fields(data) if x[0] == 1)
            f.write(json.dumps([data[start:end].decode(), kind, at, arrived]) + "\n")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def analyse(server_lines: list[dict[str, Any]], client_rows: list[list[Any]]) -> dict[str, Any]:
    """Each event's legs, in seconds: commit (its time to the poke after it),
    to_fetch (to the start of the fetch that returned it), fetch, to_send (to
    its stream's send), send (the write), client (from the send to arrival)."""
    from vmpool.domain.watch import parse_cursor

    pokes = sorted(r["t"] for r in server_lines if r["k"] == "poke")
    fetched = {}
    for r in server_lines:
        if r["k"] == "fetch":
            for pos, seq in r["ev"]:
                fetched[(pos, seq)] = (r["began"], r["t"])
    sent = {(r["pos"], r["seq"]): (r["began"], r["t"]) for r in server_lines if r["k"] == "send"}
    legs: list[dict[str, float]] = []
    for cursor, kind, at, arrived in client_rows:
        if kind in (13, 14, 15, 16, 17):  # heartbeat and snapshot messages
            continue
        c = parse_cursor(cursor)
        key = c.pos, c.seq
        if key not in fetched or key not in sent:
            continue
        f0, f1 = fetched[key]
        s0, s1 = sent[key]
        i = bisect.bisect_left(pokes, at)
        poke = pokes[i] if i < len(pokes) and pokes[i] <= f0 else f0
        legs.append(
            {
                "total": arrived - at,
                "server": s1 - at,
                "commit": poke - at,
                "to_fetch": f0 - poke,
                "fetch": f1 - f0,
                "to_send": s0 - f1,
                "send": s1 - s0,
                "client": arrived - s0,
            }
        )
    if not legs:
        return {"events": 0}
    out: dict[str, Any] = {"events": len(legs)}
    for leg in LEGS:
        values = [x[leg] for x in legs]
        out[leg] = {
            "p50_ms": _pct(values, 0.5),
            "p90_ms": _pct(values, 0.9),
            "p99_ms": _pct(values, 0.99),
        }
    slowest = sorted(legs, key=lambda x: x["total"])[-max(1, len(legs) // 100) :]
    out["slowest_1pct_ms"] = [{k: round(v * 1000, 1) for k, v in x.items()} for x in slowest]
    return out


async def run(concurrency: int, seconds: float) -> dict[str, Any]:
    from tests.bench.__main__ import LoadClient, fake, pool, wait_ready
    from tests.bench.watch import POOL, lease_load
    from tests.pg import TestPostgres
    from tests.server import ServerProcess

    pg = TestPostgres()
    load = LoadClient()
    root = Path(__file__).resolve().parents[2]
    try:
        await pg.setup_template()
        url = await pg.fresh()
        with tempfile.TemporaryDirectory(prefix="vmpool-bench-trace-") as tmp:
            trace = Path(tmp) / "server.jsonl"
            arrivals = Path(tmp) / "client.jsonl"
            cfg = {
                "reconcile_interval": "1s",
                "provider": fake(0.0),
                "pools": [pool(POOL, 300, 600, 300)],
            }
            path = os.pathsep.join(
                [
                    str(root / "tests" / "bench" / "tracehook"),
                    str(root),
                    os.environ.get("PYTHONPATH", ""),
                ]
            )
            server = ServerProcess(
                cfg,
                Path(tmp) / "main",
                database_url=url,
                metrics_port=0,
                env={ENV: str(trace), "PYTHONPATH": path},
            )
            server.start()
            db = await asyncpg.connect(url)
            child: subprocess.Popen[bytes] | None = None
            try:
                await wait_ready(db, POOL, 300, 120)
                child = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.bench.watch_trace",
                        "--child",
                        server.address,
                        str(arrivals),
                        str(seconds + 4),
                    ]
                )
                await asyncio.sleep(2)
                calls_per_s = await lease_load(load, server.address, concurrency, seconds)
                await asyncio.to_thread(child.wait, 60)
            finally:
                if child is not None and child.poll() is None:
                    child.kill()
                await db.close()
                server.__exit__()
            lines = [json.loads(x) for x in trace.read_text().splitlines()]
            rows = [json.loads(x) for x in arrivals.read_text().splitlines()]
    finally:
        load.close()
    result = analyse(lines, rows)
    result["calls_per_s"] = calls_per_s
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.watch_trace")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    if args.child:
        address, out, seconds = args.child
        asyncio.run(_child(address, out, float(seconds)))
        return 0
    result = asyncio.run(run(args.concurrency, args.seconds))
    slowest = result.pop("slowest_1pct_ms", [])
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(json.dumps(result, indent=1))
    print("slowest 1% (ms):")
    for legs in slowest:
        print("  " + json.dumps(legs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
