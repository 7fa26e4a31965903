"""`python -m tests.bench --watch [--quick]`: what WatchLeases costs (issue 20).

- Lease+Return throughput (load generator, concurrency 32) in interleaved
  rounds: event triggers disabled (what the server did before events), enabled
  with no watcher, enabled with 100 watchers that see every event (admin, the
  worst case), and enabled with 100 lease-client watchers of their own tags
  (they see none of the load's events).
- Commit-to-client latency of events (receipt time minus the event's recorded
  time, which the trigger takes just before commit) at one all-seeing stream
  beside the 100 own-tag watchers. (With 100 all-seeing watchers the Python
  watcher process, which decodes 100 copies of every event, saturates a core
  of this 2-core machine: that phase measures the client more than the server.)
- The same latency under light load (2 workers, one watcher): what a commit
  costs to reach a client when the machine is not saturated.
- Idle server CPU with 1,000 open streams against none.
- The database-side cost alone: Lease+Return through the store, one pair at
  a time, triggers off and on in alternating blocks (no server, no gRPC).

Watchers run in a process of their own (``--child``), so the load generator and
the server are not slowed by them; all share this machine's cores, so compare
the ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from grpclib.encoding.proto import ProtoCodec

from tests.bench.__main__ import (
    CpuMeter,
    LoadClient,
    fake,
    pool,
    postgres_pids,
    wait_ready,
)
from tests.bench.event_bytes import type_and_time
from tests.bench.load import percentiles
from tests.pg import TestPostgres
from tests.server import ServerProcess

TRIGGERS = [
    ("leases", "leases_events_insert"),
    ("leases", "leases_events_update"),
    ("leases", "leases_events_delete"),
    ("reservations", "reservations_events_insert"),
    ("reservations", "reservations_events_delete"),
]
POOL = "bench"
CONCURRENCY = 32


# --- the watcher process ----------------------------------------------------------------


class RawReplies(ProtoCodec):
    """A client codec that hands each reply over as its bytes."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        return bytes(data)


async def _child(cmd: dict[str, Any]) -> None:
    """Open cmd["streams"] WatchLeases streams and count what arrives, until stdin
    says "report" (print stats) or closes. cmd["decode"]: "raw" (default) reads
    only each event's type and time from its bytes, as a client in a compiled
    language costs next to nothing per event; "betterproto" decodes every
    event (about 0.2-0.5 ms of this machine's CPU each, which the watcher
    process takes from the server and the load generator on the shared cores)."""
    from grpclib.client import Channel

    from vmpool.proto.vmpool.admin import v1 as adm

    raw = cmd.get("decode", "raw") == "raw"
    host, port = cmd["address"].rsplit(":", 1)
    per_channel = 50
    n = int(cmd["streams"])
    channels = [
        Channel(host, int(port), codec=RawReplies() if raw else None)
        for _ in range((n + per_channel - 1) // per_channel)
    ]
    received = 0
    latencies: list[float] = []
    opened = 0
    all_open = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal received, opened
        started = False
        stub = adm.VmPoolExtensionServiceStub(channels[i // per_channel])
        request = adm.WatchLeasesRequest(expiring_lead_seconds=-1, **cmd["request"])
        request.pool = request.pool or ""
        if cmd.get("own_tag"):
            request.service_tag = f"watcher-{i}"
        event: Any  # bytes with RawReplies
        async for event in stub.watch_leases(request):
            if raw:
                kind, at = type_and_time(event)
            else:
                kind, at = event.type, event.time.timestamp()
            if kind == adm.LeaseEventType.HEARTBEAT:
                if not started:  # the first message: the stream is open
                    started = True
                    opened += 1
                    if opened == n:
                        all_open.set()
                continue
            received += 1
            if i % int(cmd.get("sample_every", 10)) == 0:  # a sample of the streams
                latencies.append(time.time() - at)

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.wait_for(all_open.wait(), 120)
    print(json.dumps({"open": n}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            break
        if line.strip() == "reset":
            received, latencies = 0, []
            print(json.dumps({"reset": True}), flush=True)
        elif line.strip() == "report":
            failed = [t for t in tasks if t.done()]
            print(
                json.dumps(
                    {
                        "received": received,
                        "streams_ended": len(failed),
                        **percentiles(latencies),
                    }
                ),
                flush=True,
            )
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        ch.close()


class Watchers:
    def __init__(self, address: str, streams: int, **cmd: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.watch", "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"address": address, "streams": streams, **cmd}) + "\n")
        self.proc.stdin.flush()

    def _ask(self, what: str | None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if what is not None:
            self.proc.stdin.write(what + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("watcher process exited")
        out: dict[str, Any] = json.loads(line)
        return out

    async def opened(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._ask, None)

    async def ask(self, what: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._ask, what)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- the orchestrator ----------------------------------------------------------------


async def _triggers(db: asyncpg.Connection, on: bool) -> None:
    verb = "ENABLE" if on else "DISABLE"
    for table, name in TRIGGERS:
        await db.execute(f"ALTER TABLE {table} {verb} TRIGGER {name}")


async def run(quick: bool, out: Path, decode: str = "raw") -> dict[str, Any]:
    duration = 3.0 if quick else 8.0
    rounds = 2 if quick else 4
    idle_window = 8.0 if quick else 20.0
    pg = TestPostgres()
    load = LoadClient()
    result: dict[str, Any] = {"duration_s": duration, "rounds": rounds, "watchers_decode": decode}
    try:
        await pg.setup_template()
        result["db_cost"] = await _db_cost(await pg.fresh(), 300 if quick else 1000, rounds, pg)
        print(f"watch bench: db_cost: {result['db_cost']}", flush=True)
        url = await pg.fresh()
        with tempfile.TemporaryDirectory(prefix="vmpool-bench-watch-") as tmp:
            cfg = {
                "reconcile_interval": "1s",
                "provider": fake(0.0),
                "pools": [pool(POOL, 300, 600, 300)],
                "limits": {"max_watch_streams": 2000, "max_watch_streams_per_connection": 100},
            }
            server = ServerProcess(cfg, Path(tmp) / "main", database_url=url, metrics_port=0)
            server.start()
            db = await asyncpg.connect(url)
            try:
                await wait_ready(db, POOL, 300, 120)
                result["idle"] = await _idle(server, idle_window)
                phases: dict[str, list[dict[str, Any]]] = {
                    "no_events": [],
                    "events_no_watchers": [],
                    "events_100_all_seeing": [],
                    "events_100_own_tag": [],
                }
                names = list(phases)
                for r in range(rounds):
                    # Rotated each round: no phase always follows the same one.
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        phases[name].append(
                            await _phase(name, server, db, load, duration, pg, decode=decode)
                        )
                await _triggers(db, True)
                # Latency without saturating the machine: 2 workers, one watcher.
                result["light_load"] = await _phase(
                    "light_load", server, db, load, duration, pg, concurrency=2, decode=decode
                )
            finally:
                await db.close()
                server.__exit__()
        result["phases"] = phases
        base = _median([p["calls_per_s"] for p in phases["no_events"]])
        for name, runs in phases.items():
            result[f"{name}_calls_per_s"] = _median([p["calls_per_s"] for p in runs])
            result[f"{name}_ratio"] = (
                round(result[f"{name}_calls_per_s"] / base, 3) if base else None
            )
        lat = [p.get("latency", {}) for p in phases["events_100_own_tag"]]
        result["event_latency_p99_ms"] = _median([x["p99_ms"] for x in lat if x.get("p99_ms")])
        result["event_latency_p50_ms"] = _median([x["p50_ms"] for x in lat if x.get("p50_ms")])
        light = result["light_load"].get("latency", {})
        result["light_load_event_latency_p99_ms"] = light.get("p99_ms")
        result["light_load_event_latency_p50_ms"] = light.get("p50_ms")
    finally:
        load.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "watch.json").write_text(json.dumps(result, indent=2))
    return result


async def _db_cost(url: str, pairs: int, rounds: int, pg: TestPostgres) -> dict[str, Any]:
    """Lease+Return straight through the store (no server, no gRPC), one pair at
    a time, triggers off and on in alternating blocks: the database-side cost
    of recording events, as PostgreSQL CPU per pair (less disturbed by the
    machine's other load than wall time, which is also given)."""
    from datetime import UTC, datetime, timedelta

    from vmpool.core.instant import Instant
    from vmpool.store.db import create_pool
    from vmpool.store.leases import LeaseStore

    db = await create_pool(url, min_size=1, max_size=2)
    conn = await asyncpg.connect(url)
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    try:
        await conn.execute("INSERT INTO pools (name) VALUES ('dbcost') ON CONFLICT DO NOTHING")
        store = LeaseStore(db)
        now = datetime.now(UTC)
        expires = Instant.from_datetime(now + timedelta(hours=1))
        for r in range(rounds * 2):
            mode = "on" if r % 2 else "off"
            await _triggers(conn, mode == "on")
            await conn.execute(
                """INSERT INTO instances (name, pool, state, created_at, ready_at, state_changed_at)
                   SELECT 'dbcost-' || $1::int || '-' || g, 'dbcost', 'ready', now(), now(), now()
                   FROM generate_series(1, $2) g""",
                r,
                pairs,
            )
            meter = CpuMeter(postgres_pids(pg))
            c0, t0 = meter._total(), time.perf_counter()
            for _ in range(pairs):
                got = await store.claim_free("dbcost", "t", now, expires)
                assert got is not None
                await store.return_lease(got.instance, "t", now)
            times[mode].append(round((time.perf_counter() - t0) / pairs * 1000, 3))
            cpu[mode].append(round((meter._total() - c0) / pairs * 1000, 3))
        await _triggers(conn, True)
    finally:
        await conn.close()
        await db.close()
    off, on = _median(cpu["off"]), _median(cpu["on"])
    return {
        "pairs_per_block": pairs,
        "postgres_cpu_ms_per_pair_triggers_off": off,
        "postgres_cpu_ms_per_pair_triggers_on": on,
        "cpu_ratio": round(on / off, 3) if on and off else None,
        "wall_ms_per_pair_triggers_off": _median(times["off"]),
        "wall_ms_per_pair_triggers_on": _median(times["on"]),
        "blocks_cpu_ms_per_pair": cpu,
        "blocks_wall_ms_per_pair": times,
    }


def _median(values: list[float]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else round((vals[mid - 1] + vals[mid]) / 2, 3)


async def _idle(server: ServerProcess, window: float) -> dict[str, Any]:
    assert server.proc is not None
    await asyncio.sleep(2)
    meter = CpuMeter([server.proc.pid]).start()
    await asyncio.sleep(window)
    none = meter.stop()
    watchers = Watchers(server.address, 1000, request={"pool": "nothing-here"})
    try:
        await watchers.opened()
        await asyncio.sleep(2)
        meter = CpuMeter([server.proc.pid]).start()
        await asyncio.sleep(window)
        with_streams = meter.stop()
    finally:
        watchers.close()
    return {
        "window_s": window,
        "server_cpu_percent_no_streams": none,
        "server_cpu_percent_1000_streams": with_streams,
    }


async def lease_load(load: LoadClient, address: str, concurrency: int, duration: float) -> float:
    """Lease+Return cycles by ``concurrency`` workers for ``duration`` s: calls/s."""
    got = await load.run(
        op="lease",
        address=address,
        concurrency=concurrency,
        channels=8,
        duration=duration,
        warmup=0.5,
        pool=POOL,
    )
    calls: int = sum(v["calls"] for v in got.values() if isinstance(v, dict) and "calls" in v)
    return round(calls / duration, 1)


async def _phase(
    name: str,
    server: ServerProcess,
    db: asyncpg.Connection,
    load: LoadClient,
    duration: float,
    pg: TestPostgres,
    concurrency: int = CONCURRENCY,
    decode: str = "raw",
) -> dict[str, Any]:
    await _triggers(db, name != "no_events")
    watchers: Watchers | None = None
    others: Watchers | None = None
    if name == "events_100_all_seeing":
        watchers = Watchers(server.address, 100, request={}, decode=decode)
    elif name == "light_load":
        watchers = Watchers(server.address, 1, request={}, sample_every=1, decode=decode)
    elif name == "events_100_own_tag":
        # 100 lease clients watching their own tags, and one all-seeing stream
        # that samples the latency of every event.
        others = Watchers(server.address, 100, request={}, own_tag=True, decode=decode)
        watchers = Watchers(server.address, 1, request={}, sample_every=1, decode=decode)
    try:
        for w in (others, watchers):
            if w is not None:
                await w.opened()
        assert server.proc is not None
        srv = CpuMeter([server.proc.pid]).start()
        dbm = CpuMeter(postgres_pids(pg)).start()
        # The clients' share of the shared cores: the load generator's and the
        # watcher processes'.
        gen = CpuMeter([load.proc.pid]).start()
        wat = CpuMeter([w.proc.pid for w in (others, watchers) if w is not None]).start()
        out: dict[str, Any] = {
            "calls_per_s": await lease_load(load, server.address, concurrency, duration),
            "server_cpu_percent": srv.stop(),
            "postgres_cpu_percent": dbm.stop(),
            "load_generator_cpu_percent": gen.stop(),
            "watchers_cpu_percent": wat.stop(),
        }
        if watchers is not None:
            out["latency"] = await watchers.ask("report")
        print(f"watch bench: {name}: {out}", flush=True)
        return out
    finally:
        for w in (others, watchers):
            if w is not None:
                w.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.watch")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument(
        "--watchers-decode",
        choices=["raw", "betterproto"],
        default="raw",
        help="how the watcher processes read events (see _child)",
    )
    args = parser.parse_args(argv)
    if args.child:
        cmd = json.loads(sys.stdin.readline())
        asyncio.run(_child(cmd))
        return 0
    result = asyncio.run(run(args.quick, Path(args.out), args.watchers_decode))
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
