"""`python -m tests.bench [--quick] [--profile] [--out DIR]`: measure vmpool against
its targets and write DIR/latest.json, DIR/latest.md and DIR/latest.png.

Processes: an embedded PostgreSQL (pgserver, temp dir), `vmpool serve` (one per
scenario, fake provider, its own fresh database), and one load-generator process
(tests.bench.load). See docs/performance.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from tests.bench import auth as auth_phase
from tests.bench import autoscale, report, versus
from tests.pg import TestPostgres, with_database
from tests.server import ServerProcess
from vmpool.domain.spec_hash import spec_hash

CONCURRENCY = (1, 16, 64)
CHANNELS = 8  # HTTP/2 connections per load phase (workers share them round-robin)
MAIN_POOL = "bench"
SCALE_POOL = "scale"
HANDOFF_POOL = "handoff"
SCENARIOS = ("versus", "throughput", "scale", "handoff", "idle", "auth")
DEFAULT_SCENARIOS = ("versus", "throughput", "scale", "handoff", "idle")  # --auth adds auth


class Settings:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.duration = 2.5 if quick else 6.0  # measured seconds per load phase
        self.warmup = 0.5 if quick else 1.0
        self.scale_duration = 3.0 if quick else 10.0
        self.handoff_samples = 30 if quick else 200
        self.idle_window = 10.0 if quick else 30.0
        self.idle_settle = 4.0 if quick else 8.0
        # vmpool against the floor: measured seconds per phase, interleaved rounds.
        self.versus_duration = 2.0 if quick else 5.0
        self.versus_rounds = 3
        self.generators: tuple[str, ...] = ("grpc-go", "grpclib")
        self.baseline: Path | None = None  # a checkout measured as "before" beside the floor
        self.split = False  # the vmpool side as --role api + --role reconciler


# --- processes -----------------------------------------------------------------------


class LoadClient:
    """The load-generator process; one JSON command per line."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.load"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("load generator exited")
        result: dict[str, Any] = json.loads(line)
        if "failed" in result:
            raise RuntimeError(f"load generator: {result['failed']}")
        return result

    async def run(self, **cmd: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self._call, cmd)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.flush()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class CpuMeter:
    """CPU seconds used by a set of processes between start() and stop(), as % of one core."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]

    def _total(self) -> float:
        total = 0.0
        for proc in self.procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def start(self) -> CpuMeter:
        self.t0, self.c0 = time.perf_counter(), self._total()
        return self

    def stop(self) -> float:
        return round(100 * (self._total() - self.c0) / (time.perf_counter() - self.t0), 1)


class MachineMeter(CpuMeter):
    """Busy CPU of the whole machine (all processes), as % of one core."""

    def __init__(self) -> None:
        self.procs = []

    def _total(self) -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def postgres_pids(pg: TestPostgres) -> list[int]:
    pid_file = Path(getattr(pg, "_dir", "")) / "postmaster.pid"
    if not pid_file.exists():
        return []
    main = psutil.Process(int(pid_file.read_text().split()[0]))
    return [main.pid, *(c.pid for c in main.children(recursive=True))]


def fake(boot_seconds: float = 0.0) -> dict[str, Any]:
    return {"kind": "fake", "fake": {"boot_seconds": boot_seconds}}


def pool(name: str, min_ready: int, max_size: int, max_provisioning: int) -> dict[str, Any]:
    return {
        "name": name,
        "min_ready": min_ready,
        "max_size": max_size,
        "max_provisioning": max_provisioning,
    }


def server_config(pools: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"reconcile_interval": "1s", "provider": fake(0.0), "pools": pools, **extra}


async def wait_log(server: ServerProcess, needle: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in server.log():
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.log_path.name} exited:\n{server.log()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.log_path.name}: no {needle!r} after {timeout}s")
        await asyncio.sleep(0.05)


async def transactions(db: asyncpg.Connection) -> int:
    await db.execute("SELECT pg_stat_clear_snapshot()")
    n: int = await db.fetchval(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database "
        "WHERE datname = current_database()"
    )
    return n


async def ready_count(db: asyncpg.Connection, name: str) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM instances WHERE pool = $1 AND state = 'ready'", name
    )
    return n


async def wait_ready(db: asyncpg.Connection, name: str, n: int, timeout: float) -> float:
    """Seconds until ``name`` has at least ``n`` ready instances (polled every 20 ms)."""
    t0 = time.perf_counter()
    while await ready_count(db, name) < n:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"pool {name}: fewer than {n} ready after {timeout}s")
        await asyncio.sleep(0.02)
    return time.perf_counter() - t0


# --- scenarios -------------------------------------------------------------------------


class Bench:
    def __init__(self, s: Settings, pg: TestPostgres, work: Path, out: Path, profile: bool) -> None:
        self.s = s
        self.pg = pg
        self.work = work
        self.out = out
        self.profile = profile
        self.load = LoadClient()
        self.details: dict[str, Any] = {}
        self.extra_servers: list[ServerProcess] = []
        self.failures: list[str] = []

    async def phase(
        self,
        server: ServerProcess,
        op: str,
        c: int,
        db: asyncpg.Connection | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """One load phase; with ``db`` (the server's database) also counts its
        transactions per call and the pool's ready instances afterwards."""
        assert server.proc is not None
        servers = [server.proc.pid, *(x.proc.pid for x in self.extra_servers if x.proc)]
        x0 = await transactions(db) if db is not None else 0
        srv = CpuMeter(servers).start()
        dbm = CpuMeter(postgres_pids(self.pg)).start()
        cli = CpuMeter([self.load.proc.pid]).start()
        box = MachineMeter().start()
        result = await self.load.run(
            op=op,
            address=server.address,
            concurrency=c,
            channels=CHANNELS,
            duration=self.s.duration,
            warmup=self.s.warmup,
            **extra,
        )
        result["server_cpu_percent"] = srv.stop()
        result["postgres_cpu_percent"] = dbm.stop()
        ours = result["server_cpu_percent"] + result["postgres_cpu_percent"] + cli.stop()
        # Anything else on the machine (other test runs) competes for the same cores.
        result["other_processes_cpu_percent"] = round(max(box.stop() - ours, 0.0), 1)
        result["concurrency"] = c
        calls = sum(v["calls"] for k, v in result.items() if isinstance(v, dict) and "calls" in v)
        if calls and result["server_cpu_percent"]:
            # CPU over the whole run, calls inside the measured window: scale by its length.
            result["server_cpu_ms_per_call"] = round(
                10 * result["server_cpu_percent"] * self.s.duration / calls, 3
            )
        if db is not None and calls:
            # Backends publish their statistics at most once a second.
            await asyncio.sleep(1.1)
            # Includes the warm-up and the reconciler's work; an upper bound per call.
            result["db_transactions_per_call"] = round((await transactions(db) - x0) / calls, 2)
            result["ready_after"] = await ready_count(db, extra.get("pool", MAIN_POOL))
        return result

    async def versus(self) -> None:
        """The floor server and `vmpool serve`, interleaved (tests/bench/versus.py)."""
        self.details["versus"] = await versus.compare(
            self.work / "versus",
            self.pg,
            self.load,
            duration=self.s.versus_duration,
            warmup=self.s.warmup,
            rounds=self.s.versus_rounds,
            generators=self.s.generators,
            baseline=self.s.baseline,
            split=self.s.split,
            log=lambda line: print(line, flush=True),
        )

    async def auth(self) -> None:
        """TLS + kubernetes auth against plain, interleaved (tests/bench/auth.py)."""
        self.details["auth"] = r = await auth_phase.compare(
            self.work / "auth",
            self.pg,
            duration=self.s.versus_duration,
            warmup=self.s.warmup,
            rounds=self.s.versus_rounds,
            log=lambda line: print(line, flush=True),
        )
        print(
            f"auth: server CPU per call with/without {r.get('cpu_ratio')}, token reviews "
            f"{r.get('token_reviews')}, cache hit rate >= {r.get('cache_hit_rate_at_least')}",
            flush=True,
        )

    async def throughput(self) -> None:
        """Refill of a 1,000-instance pool, then Ping and Lease->Return at each
        concurrency, then a second server process on the same database and port."""
        url = await self.pg.fresh()
        cfg = server_config([pool(MAIN_POOL, 1000, 1000, 1000)])
        server = ServerProcess(
            cfg,
            self.work / "main",
            database_url=url,
            metrics_port=0,
            name="main",
            args=("--reuse-port",),  # the two-process phase shares its port
        )
        db = await asyncpg.connect(url)
        second: ServerProcess | None = None
        try:
            t0 = time.perf_counter()
            server.start()
            listening = time.perf_counter() - t0
            await wait_ready(db, MAIN_POOL, 1000, 60)
            refill = time.perf_counter() - t0
            self.details["refill"] = {
                "seconds_from_spawn": round(refill, 3),
                "seconds_to_listen": round(listening, 3),
                "seconds_from_listen": round(refill - listening, 3),
                "pool": pool(MAIN_POOL, 1000, 1000, 1000),
                "boot_seconds": 0,
            }
            print(
                f"refill: 1000 ready {refill:.2f}s after spawn "
                f"({refill - listening:.2f}s after listening)",
                flush=True,
            )

            ping: dict[str, Any] = {}
            for c in CONCURRENCY:
                ping[str(c)] = r = await self.phase(server, "ping", c)
                print(
                    f"ping c={c}: {r['calls_per_s']}/s p50 {r['ping']['p50_ms']} ms "
                    f"p99 {r['ping']['p99_ms']} ms (server cpu {r['server_cpu_percent']}%, "
                    f"client cpu {r['client_cpu_percent']}%, other "
                    f"{r['other_processes_cpu_percent']}%)",
                    flush=True,
                )
            self.details["ping"] = ping

            lease: dict[str, Any] = {}
            for c in CONCURRENCY:
                await wait_ready(db, MAIN_POOL, 900, 30)
                lease[str(c)] = r = await self.phase(server, "lease", c, db, pool=MAIN_POOL)
                print(
                    f"lease+return c={c}: {r['calls_per_s']} calls/s; lease p50 "
                    f"{r.get('lease', {}).get('p50_ms')} p99 "
                    f"{r.get('lease', {}).get('p99_ms')} ms; return p50 "
                    f"{r.get('return', {}).get('p50_ms')} p99 "
                    f"{r.get('return', {}).get('p99_ms')} ms; errors {r['errors']} "
                    f"(server cpu {r['server_cpu_percent']}%, pg cpu "
                    f"{r['postgres_cpu_percent']}%, client cpu {r['client_cpu_percent']}%, other "
                    f"{r['other_processes_cpu_percent']}%)",
                    flush=True,
                )
            self.details["lease"] = lease

            if self.profile:
                await wait_ready(db, MAIN_POOL, 900, 30)
                self.details["profile"] = await self.profiled(server)

            # A second process on the same database, listening on the same port.
            await wait_ready(db, MAIN_POOL, 900, 30)
            second = ServerProcess(
                cfg,
                self.work / "second",
                database_url=url,
                port=server.port,
                metrics_port=0,
                name="second",
                args=("--reuse-port",),
            )
            second.start()
            await wait_log(second, '"serving"')
            self.extra_servers = [second]
            assert second.proc is not None and server.proc is not None
            one = CpuMeter([server.proc.pid]).start()
            two = CpuMeter([second.proc.pid]).start()
            r = await self.phase(server, "lease", 64, db, pool=MAIN_POOL)
            r["server_cpu_percent_each"] = [one.stop(), two.stop()]
            self.extra_servers = []
            self.details["two_process"] = r
            print(
                f"two processes, lease+return c=64: {r['calls_per_s']} calls/s "
                f"(cpu per server {r['server_cpu_percent_each']}%, pg "
                f"{r['postgres_cpu_percent']}%, client {r['client_cpu_percent']}%), "
                f"errors {r['errors']}",
                flush=True,
            )
        finally:
            await db.close()
            if second is not None:
                second.__exit__()
            server.__exit__()

    async def profiled(self, server: ServerProcess) -> dict[str, Any]:
        """py-spy on the server during a Lease->Return phase at concurrency 64: a
        flame graph (profile-lease.svg) and the collapsed stacks (profile-lease.txt)
        from two samplers over the same seconds."""
        assert server.proc is not None
        spy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        if spy is None:
            return {"skipped": "py-spy is not installed"}
        raw, svg = self.out / "profile-lease.txt", self.out / "profile-lease.svg"
        secs = max(3, int(self.s.duration))
        samplers = [
            await asyncio.create_subprocess_exec(
                spy,
                "record",
                "-p",
                str(server.proc.pid),
                "-d",
                str(secs),
                "-r",
                "100",
                "-f",
                fmt,
                "-o",
                str(path),
                "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for fmt, path in (("raw", raw), ("flamegraph", svg))
        ]
        r = await self.phase(server, "lease", 64, pool=MAIN_POOL)
        for sampler in samplers:
            await sampler.wait()
        r["top"] = report.top_frames(raw) if raw.exists() else []
        r["flamegraph"] = svg.name if svg.exists() else None
        return r

    async def scale(self) -> None:
        """Lease p50/p99 in a 100-instance pool, alone, then beside 10,000 ready
        instances in 100 pools and 10,000 queued reservations in 100 more pools."""
        results: dict[str, Any] = {}
        for label in ("small", "big"):
            url = await self.pg.fresh()
            pools = [pool(SCALE_POOL, 100, 200, 100)]
            if label == "big":
                pools += [pool(f"fill-{p:03d}", 100, 100, 5) for p in range(100)]
                pools += [pool(f"queue-{p:03d}", 0, 0, 1) for p in range(100)]
                await seed(url, ready_pools=100, per_pool=100, queue_pools=100, queued=100)
            server = ServerProcess(
                server_config(pools),
                self.work / f"scale-{label}",
                database_url=url,
                metrics_port=0,
                name=f"scale-{label}",
            )
            db = await asyncpg.connect(url)
            try:
                server.start()
                await wait_ready(db, SCALE_POOL, 100, 30)
                await asyncio.sleep(1.5)  # let the first reconcile passes (full resync) finish
                counts = dict(
                    await db.fetch("SELECT state, count(*) FROM instances GROUP BY state")
                )
                queued = await db.fetchval("SELECT count(*) FROM reservations")
                r = await self.load.run(
                    op="lease",
                    address=server.address,
                    concurrency=1,
                    channels=1,
                    duration=self.s.scale_duration,
                    warmup=self.s.warmup,
                    pool=SCALE_POOL,
                )
                r["instances_by_state"] = {k: int(v) for k, v in counts.items()}
                r["reservations"] = int(queued)
                results[label] = r
                lease = r.get("lease", {})
                print(
                    f"scale {label}: lease p50 {lease.get('p50_ms')} p99 "
                    f"{lease.get('p99_ms')} ms at concurrency 1 ({counts}, "
                    f"{queued} reservations), errors {r['errors']}",
                    flush=True,
                )
            finally:
                await db.close()
                server.__exit__()
        self.details["scale"] = results

    async def handoff(self) -> None:
        """A waiting Lease (reservation_id + x-vmpool-wait) in an empty pool: the
        reservation is demand, the reconciler provisions (boot 0 s), sets aside, wakes."""
        url = await self.pg.fresh()
        server = ServerProcess(
            server_config([pool(HANDOFF_POOL, 0, 50, 50)]),
            self.work / "handoff",
            database_url=url,
            metrics_port=0,
            name="handoff",
        )
        try:
            server.start()
            await wait_log(server, '"serving"')
            r = await self.load.run(
                op="handoff",
                address=server.address,
                concurrency=1,
                channels=1,
                count=self.s.handoff_samples,
                wait="10s",
                pool=HANDOFF_POOL,
                database_url=url,
            )
        finally:
            server.__exit__()
        from tests.bench.load import percentiles

        gaps = [x["ready_to_return_s"] for x in r["samples"] if x["ready_to_return_s"] is not None]
        calls = [x["lease_call_s"] for x in r["samples"]]
        self.details["handoff"] = {
            "samples": len(gaps),
            "errors": r["errors"],
            "ready_to_return": percentiles(gaps),
            "lease_call": percentiles(calls),
        }
        print(
            f"handoff: ready->Lease returned p50 "
            f"{self.details['handoff']['ready_to_return']['p50_ms']} p99 "
            f"{self.details['handoff']['ready_to_return']['p99_ms']} ms over {len(gaps)}; "
            f"whole waiting Lease p50 {self.details['handoff']['lease_call']['p50_ms']} ms",
            flush=True,
        )

    async def idle(self) -> None:
        """10,000 ready instances in 100 pools, no calls: server CPU and statements/s."""
        url = await self.pg.fresh()
        await seed(url, ready_pools=100, per_pool=100, queue_pools=0, queued=0)
        pools = [pool(f"fill-{p:03d}", 100, 100, 5) for p in range(100)]
        server = ServerProcess(
            server_config(pools), self.work / "idle", database_url=url, metrics_port=0, name="idle"
        )
        dbname = urllib.parse.urlsplit(url).path.lstrip("/")
        # Measure from another database, so our own queries do not count.
        admin = await asyncpg.connect(with_database(url, "postgres"))
        query = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1"
        try:
            server.start()
            await asyncio.sleep(self.s.idle_settle)
            assert server.proc is not None
            cpu = CpuMeter([server.proc.pid])
            await admin.execute("SELECT pg_stat_clear_snapshot()")
            x0 = await admin.fetchval(query, dbname)
            cpu.start()
            t0 = time.perf_counter()
            seen = await sample_statements(admin, dbname, self.s.idle_window)
            cpu_pct = cpu.stop()
            # Backends flush their statistics at most once a second: let them.
            await asyncio.sleep(1.2)
            await admin.execute("SELECT pg_stat_clear_snapshot()")
            x1 = await admin.fetchval(query, dbname)
            elapsed = time.perf_counter() - t0
            counts = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", dbname
            )
        finally:
            await admin.close()
            server.__exit__()
        self.details["idle"] = {
            "window_s": self.s.idle_window,
            "server_cpu_percent": cpu_pct,
            "transactions": int(x1 - x0),
            "transactions_per_s": round((x1 - x0) / elapsed, 2),
            "server_connections": int(counts),
            # Cross-check: distinct (backend, query_start) seen in pg_stat_activity,
            # sampled every 5 ms: the statements themselves, by text.
            "sampled_statements_per_s": round(sum(seen.values()) / self.s.idle_window, 2),
            "sampled_statements": dict(seen.most_common(10)),
            "instances": 10000,
        }
        print(
            f"idle: server cpu {cpu_pct}% of a core; {x1 - x0} transactions in {elapsed:.1f}s",
            flush=True,
        )

    def close(self) -> None:
        self.load.close()


async def sample_statements(admin: asyncpg.Connection, dbname: str, seconds: float) -> Counter[str]:
    """Statements run in ``dbname`` during ``seconds``, by their first 60 characters."""
    seen: set[tuple[int, Any, str]] = set()
    start = await admin.fetchval("SELECT clock_timestamp()")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for r in await admin.fetch(
            "SELECT pid, query_start, left(regexp_replace(query, '\\s+', ' ', 'g'), 60) AS q "
            "FROM pg_stat_activity WHERE datname = $1 AND query_start IS NOT NULL",
            dbname,
        ):
            if r["query_start"] >= start:
                seen.add((r["pid"], r["query_start"], r["q"].strip()))
        await asyncio.sleep(0.005)
    return Counter(q for _, _, q in seen)


async def seed(url: str, *, ready_pools: int, per_pool: int, queue_pools: int, queued: int) -> None:
    """Insert ready instances (with their fake VMs) and queued reservations directly."""
    db = await asyncpg.connect(url)
    try:
        async with db.transaction():
            await db.execute(
                "INSERT INTO pools (name) SELECT format('fill-%s', lpad(p::text, 3, '0')) "
                "FROM generate_series(0, $1 - 1) p",
                ready_pools,
            )
            await db.execute(
                "INSERT INTO pools (name) SELECT format('queue-%s', lpad(p::text, 3, '0')) "
                "FROM generate_series(0, $1 - 1) p",
                queue_pools,
            )
            await db.execute(
                """
                INSERT INTO instances (name, pool, state, zone, created_at, ready_at,
                                       state_changed_at, spec_hash)
                SELECT format('vmp-seed-%s-%s', p, i), format('fill-%s', lpad(p::text, 3, '0')),
                       'ready', 'fake-zone-a', now() - interval '1 hour',
                       now() - interval '1 hour' + i * interval '1 ms', now(), $3
                FROM generate_series(0, $1 - 1) p, generate_series(0, $2 - 1) i
            """,
                ready_pools,
                per_pool,
                spec_hash({"template": {}}),  # as the pools' (empty) templates: current
            )
            await db.execute("""
                INSERT INTO fake_vms (name, pool, created_at, ready_at, fails, zone)
                SELECT name, pool, created_at, ready_at, false, zone FROM instances
            """)
            await db.execute(
                """
                INSERT INTO reservations (id, pool, service_tag, enqueued_at, expires_at)
                SELECT gen_random_uuid(), format('queue-%s', lpad(p::text, 3, '0')), 'bench',
                       now(), now() + interval '1 day'
                FROM generate_series(0, $1 - 1) p, generate_series(0, $2 - 1) i
            """,
                queue_pools,
                queued,
            )
        await db.execute("VACUUM ANALYZE")  # or autovacuum would run during the idle window
    finally:
        await db.close()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


async def machine(pg_url: str) -> dict[str, Any]:
    model = cpu_model()
    db = await asyncpg.connect(pg_url)
    try:
        version = await db.fetchval("SHOW server_version")
    finally:
        await db.close()
    return {
        "cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_model": model or platform.processor(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "postgresql": version,
        "os": f"{platform.system()} {platform.release()}",
        "load_average_at_start": [round(x, 2) for x in psutil.getloadavg()],
    }


async def run(args: argparse.Namespace) -> int:
    s = Settings(args.quick)
    s.versus_rounds = args.rounds
    s.generators = tuple(args.generators.split(","))
    s.baseline = Path(args.baseline) if args.baseline else None
    s.split = args.split
    out = Path(args.out)
    started = time.perf_counter()
    pg = TestPostgres()
    bench: Bench | None = None
    try:
        await pg.setup_template()
        info = await machine(pg.url)
        print(f"machine: {info}", flush=True)
        with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
            bench = Bench(s, pg, Path(tmp), out, args.profile)
            for name in [*args.only.split(","), *(["auth"] if args.auth else [])]:
                t0 = time.perf_counter()
                try:
                    await getattr(bench, name)()
                except Exception as err:  # report, keep measuring the rest
                    bench.failures.append(f"{name}: {type(err).__name__}: {err}")
                    print(f"FAILED to measure {name}: {err!r}", flush=True)
                bench.details.setdefault("scenario_seconds", {})[name] = round(
                    time.perf_counter() - t0, 1
                )
            bench.close()
    finally:
        if bench is not None:
            bench.close()
        pg.stop()
    result = report.headline(bench.details, info, s.quick, bench.failures)
    result["details"]["total_seconds"] = round(time.perf_counter() - started, 1)
    # Only the committed results (the default --out) rewrite docs/performance.md's table.
    default_out = Path(args.out).resolve() == (Path.cwd() / "bench-results").resolve()
    report.write(result, out, doc=report.PERFORMANCE_DOC if default_out else None)
    for line in report.verdicts(result):
        print(line)
    print(f"wrote {out / 'latest.json'}, {out / 'latest.md'}, {out / 'latest.png'}")
    missing = [k for k in report.HEADLINE if result.get(k) is None]
    if missing:
        print(f"could not measure: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short phases (under 2 minutes)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also py-spy the server under Lease load (profile-lease.*)",
    )
    parser.add_argument("--out", default="bench-results", help="output directory")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated scenarios to run (default: {','.join(DEFAULT_SCENARIOS)}; "
        f"any of {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds against the floor (3)"
    )
    parser.add_argument(
        "--generators",
        default="grpc-go,grpclib",
        help="load generators against the floor (grpc-go is skipped without Go)",
    )
    parser.add_argument(
        "--autoscale", action="store_true", help="the adaptive warm pool simulation only"
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="only the WatchLeases costs (tests/bench/watch.py; writes OUT/watch.json)",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="also the TLS + kubernetes auth phase (tests/bench/auth.py)",
    )
    parser.add_argument(
        "--baseline",
        metavar="CHECKOUT",
        help="also run `vmpool serve` from this checkout (e.g. a `git worktree` of the "
        "commit before a change) in the versus rounds: before/after ratios in one run",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="in the versus rounds, run the vmpool side as `vmpool serve --role api` plus "
        "`--role reconciler` (two processes, both counted; with --baseline: split / one process)",
    )
    args = parser.parse_args()
    if args.watch:
        from tests.bench import watch  # its own phases (issue 20)

        return watch.main([*(["--quick"] if args.quick else []), "--out", args.out])
    if unknown := set(args.only.split(",")) - set(SCENARIOS):
        parser.error(f"--only: no scenario {', '.join(sorted(unknown))}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.autoscale:
        return autoscale.main(Path(args.out))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
