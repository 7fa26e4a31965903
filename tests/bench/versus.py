"""vmpool against the floor (tests/bench/floor.py), side by side in one run.

Both servers run at once, each on its own PostgreSQL (pgserver, the same
settings); the phases are interleaved: in each round, for each generator
(grpc-go when Go is installed, and the Python grpclib one), Ping at c=64,
Lease->Return at c=64 and at c=1, on one server then the other (the order
alternates between rounds). Every vmpool figure is then a ratio to the floor's
of the same round and generator; a round's ratios are what count on a shared,
noisy machine, not absolute numbers across runs.

Server CPU is the whole process tree's utime+stime (psutil); the machine's CPU
is all busy time (/proc/stat) over the phase, so work moved into PostgreSQL or
the reconciler is counted too.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import psutil

from tests.bench import floor
from tests.golang import build_go_client, go_available
from tests.pg import TestPostgres
from tests.server import ServerProcess, free_port, wait_for_port

POOL = "bench"
CHANNELS = 8
# The vmpool side, as the issue describes the independent check.
VMPOOL_POOL = {"name": POOL, "min_ready": 400, "max_size": 1000, "max_provisioning": 1000}
VMPOOL_CONFIG = {
    "reconcile_interval": "200ms",
    "provider": {"kind": "fake", "fake": {"boot_seconds": 0}},
    "pools": [VMPOOL_POOL],
}
# (op, concurrency) measured per round and generator.
PHASES = (("ping", 64), ("lease", 64), ("lease", 1))


class Generator(Protocol):
    name: str

    async def run(self, **cmd: Any) -> dict[str, Any]: ...

    def cpu_pid(self) -> int | None: ...


class PythonGenerator:
    """The grpclib load generator process (tests.bench.load), via the bench's client."""

    name = "grpclib"

    def __init__(self, client: Any) -> None:
        self.client = client

    async def run(self, **cmd: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.client.run(**cmd)
        return result

    def cpu_pid(self) -> int | None:
        pid: int = self.client.proc.pid
        return pid


class GoGenerator:
    """tests/gogrpc's `--load` mode: one process per phase; it reports its own CPU."""

    name = "grpc-go"

    def __init__(self, binary: Path, env: dict[str, str] | None = None) -> None:
        self.binary = binary
        self.env = env  # e.g. ACC_CA and ACC_TOKEN: TLS and a bearer token (creds.go)

    async def run(self, **cmd: Any) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            str(self.binary),
            cmd["address"],
            "--load",
            cmd["op"],
            str(cmd["concurrency"]),
            f"{cmd['duration']}s",
            f"{cmd['warmup']}s",
            cmd.get("pool", POOL),
            str(cmd.get("channels", CHANNELS)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.env} if self.env else None,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"grpc-go load exited {proc.returncode}: {err.decode()[-500:]}")
        result: dict[str, Any] = json.loads(out)
        return result

    def cpu_pid(self) -> int | None:
        return None


class Tree:
    """CPU seconds (utime+stime) of processes and all their descendants (one
    server's processes: a `--role api` + `--role reconciler` pair counts both)."""

    def __init__(self, pid: int, *more: int) -> None:
        self.roots = [psutil.Process(p) for p in (pid, *more)]

    def seconds(self) -> float:
        total = 0.0
        for root in self.roots:
            for proc in [root, *root.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += t.user + t.system + t.children_user + t.children_system
        return total


def machine_seconds() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def postgres_tree(pg: TestPostgres) -> Tree | None:
    pid_file = Path(getattr(pg, "_dir", "")) / "postmaster.pid"
    if not pid_file.exists():
        return None
    return Tree(int(pid_file.read_text().split()[0]))


class Side:
    """One server under test: its address, process tree, PostgreSQL and database."""

    def __init__(
        self, name: str, pids: list[int], address: str, pg: TestPostgres, url: str
    ) -> None:
        self.name = name
        self.tree = Tree(*pids)
        self.address = address
        self.pg_tree = postgres_tree(pg)
        self.url = url


async def measure(
    side: Side, gen: Generator, op: str, c: int, duration: float, warmup: float
) -> dict[str, Any]:
    gen_pid = gen.cpu_pid()
    gen_tree = Tree(gen_pid) if gen_pid else None
    s0 = side.tree.seconds()
    p0 = side.pg_tree.seconds() if side.pg_tree else 0.0
    g0 = gen_tree.seconds() if gen_tree else 0.0
    m0, t0 = machine_seconds(), time.perf_counter()
    r = await gen.run(
        op=op,
        address=side.address,
        concurrency=c,
        channels=CHANNELS,
        duration=duration,
        warmup=warmup,
        pool=POOL,
    )
    wall = time.perf_counter() - t0
    server = side.tree.seconds() - s0
    machine = machine_seconds() - m0
    pg = (side.pg_tree.seconds() - p0) if side.pg_tree else None
    if gen_tree:
        r["client_cpu_percent"] = round(100 * (gen_tree.seconds() - g0) / wall, 1)
    r["server_cpu_percent"] = round(100 * server / wall, 1)
    r["machine_cpu_percent"] = round(100 * machine / wall, 1)
    r["postgres_cpu_percent"] = None if pg is None else round(100 * pg / wall, 1)
    # CPU over the whole phase (warm-up included) against the window's call rate.
    calls = r["calls_per_s"] * wall
    if calls:
        r["server_cpu_ms_per_call"] = round(1000 * server / calls, 4)
        r["machine_cpu_ms_per_call"] = round(1000 * machine / calls, 4)
    r["concurrency"] = c
    return r


async def ready(url: str, n: int, timeout: float = 30.0) -> None:
    db = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + timeout
        q = "SELECT count(*) FROM instances WHERE pool = $1 AND state = 'ready'"
        while await db.fetchval(q, POOL) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"vmpool pool {POOL}: fewer than {n} ready")
            await asyncio.sleep(0.05)
    finally:
        await db.close()


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _div(a: Any, b: Any) -> float | None:
    return None if a is None or not b else round(a / b, 3)


# name -> (phase key, path in the phase result); vmpool's value / the floor's.
RATIOS = {
    "ping_server_cpu": ("ping@64", ("server_cpu_ms_per_call",)),
    "lease_server_cpu": ("lease@64", ("server_cpu_ms_per_call",)),
    "lease_machine_cpu": ("lease@64", ("machine_cpu_ms_per_call",)),
    "ping_rps": ("ping@64", ("calls_per_s",)),
    "lease_rps": ("lease@64", ("calls_per_s",)),
    "cycle_p99": ("lease@64", ("cycle", "p99_ms")),
    "c1_cycle_p50": ("lease@1", ("cycle", "p50_ms")),
    "c1_lease_server_cpu": ("lease@1", ("server_cpu_ms_per_call",)),
}


def ratios(rounds: list[dict[str, Any]], num: str = "vmpool", den: str = "floor") -> dict[str, Any]:
    """Per ratio: each round's num/den value (vmpool/floor), their median, min and max."""
    out: dict[str, Any] = {}
    for name, (phase, path) in RATIOS.items():
        each = [_div(_get(r, num, phase, *path), _get(r, den, phase, *path)) for r in rounds]
        known = [x for x in each if x is not None]
        out[name] = {
            "rounds": each,
            "median": round(statistics.median(known), 3) if known else None,
            "min": min(known, default=None),
            "max": max(known, default=None),
        }
    return out


def ratio_sets(rounds: list[dict[str, Any]], *, with_before: bool) -> dict[str, Any]:
    """vmpool / floor; with a baseline also before / floor and vmpool / before."""
    out = {"ratios": ratios(rounds)}
    if with_before:
        out["ratios_before"] = ratios(rounds, num="before", den="floor")
        out["ratios_after_to_before"] = ratios(rounds, num="vmpool", den="before")
    return out


def errors_of(rounds: list[dict[str, Any]], side: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in rounds:
        for phase in r.get(side, {}).values():
            for k, v in phase.get("errors", {}).items():
                total[k] = total.get(k, 0) + v
    return total


def start_floor(work: Path, url: str) -> tuple[subprocess.Popen[bytes], int]:
    stubs = work / "floor-stubs"
    floor.generate_stubs(stubs)
    port = free_port()
    with (work / "floor.log").open("wb") as flog:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.bench.floor",
                "--stubs",
                str(stubs),
                "--database-url",
                url,
                "--port",
                str(port),
                "--pool",
                POOL,
            ],
            stdout=flog,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port, 30.0, proc)
    return proc, port


async def start_vmpool(
    work: Path, pg: TestPostgres, name: str, checkout: Path | None = None, *, split: bool = False
) -> tuple[list[ServerProcess], str]:
    """`vmpool serve` on a fresh database; ``checkout``: the code of another
    checkout (its directory first on PYTHONPATH), for a before/after run;
    ``split``: `--role reconciler` and `--role api` as two processes (the
    first one listed serves the calls)."""
    url = await pg.fresh()
    env = {"PYTHONPATH": str(checkout.resolve())} if checkout is not None else None
    roles = [("api", ("--role", "api")), ("reconciler", ("--role", "reconciler"))]
    servers = [
        ServerProcess(
            VMPOOL_CONFIG,
            work / name,
            database_url=url,
            # The reconciler role listens on no gRPC port: its metrics port is its sign of life.
            metrics_port=None if role == "reconciler" else 0,
            name=f"{name}-{role}",
            env=env,
            args=args,
        )
        for role, args in (roles if split else [("all", ())])
    ]
    for server in servers:
        await asyncio.to_thread(server.start)
    return servers, url


async def compare(
    work: Path,
    vmpool_pg: TestPostgres,
    load_client: Any,
    *,
    duration: float,
    warmup: float,
    rounds: int = 3,
    generators: tuple[str, ...] = ("grpc-go", "grpclib"),
    baseline: Path | None = None,
    split: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """The floor and `vmpool serve` (and, with ``baseline``, `vmpool serve` from
    that checkout as "before"), interleaved; returns per generator the rounds'
    phases and the ratios (with a baseline also vmpool / before). ``split``:
    the "vmpool" side is a `--role api` and a `--role reconciler` process."""
    gens: list[Generator] = []
    if "grpc-go" in generators and go_available():
        gens.append(GoGenerator(await asyncio.to_thread(build_go_client, work / "go")))
    if "grpclib" in generators or not gens:
        gens.append(PythonGenerator(load_client))
    floor_pg = TestPostgres()  # its own PostgreSQL, the same (default) settings
    floor_proc: subprocess.Popen[bytes] | None = None
    servers: list[ServerProcess] = []
    try:
        floor_url = await floor_pg.empty()
        floor_proc, port = await asyncio.to_thread(start_floor, work, floor_url)
        sides = {"floor": Side("floor", [floor_proc.pid], f"127.0.0.1:{port}", floor_pg, floor_url)}
        for name, checkout in [("vmpool", None), *([("before", baseline)] if baseline else [])]:
            started, url = await start_vmpool(
                work, vmpool_pg, name, checkout, split=split and name == "vmpool"
            )
            servers.extend(started)
            pids = [s.proc.pid for s in started if s.proc is not None]
            await ready(url, 400)
            sides[name] = Side(name, pids, started[0].address, vmpool_pg, url)
        results: dict[str, Any] = {}
        for gen in gens:
            results[gen.name] = {"rounds": []}
        for i in range(rounds):
            order = list(sides)[i % len(sides) :] + list(sides)[: i % len(sides)]
            for gen in gens:
                rnd: dict[str, Any] = {name: {} for name in sides}
                rnd["order"] = order
                for op, c in PHASES:
                    for name in order:
                        if name != "floor" and op == "lease":
                            await ready(sides[name].url, 390)  # never measure a pool running dry
                        r = await measure(sides[name], gen, op, c, duration, warmup)
                        rnd[name][f"{op}@{c}"] = r
                        log(
                            f"versus round {i + 1} {gen.name} {name} {op} c={c}: "
                            f"{r['calls_per_s']}/s, server {r.get('server_cpu_ms_per_call')} "
                            f"ms/call, machine {r.get('machine_cpu_ms_per_call')} ms/call, "
                            f"cycle p50/p99 {_get(r, 'cycle', 'p50_ms')}/"
                            f"{_get(r, 'cycle', 'p99_ms')} ms, errors {r['errors']}"
                        )
                results[gen.name]["rounds"].append(rnd)
        for gen in gens:
            g = results[gen.name]
            g.update(ratio_sets(g["rounds"], with_before=bool(baseline)))
            g["errors"] = {side: errors_of(g["rounds"], side) for side in sides}
        results["generators"] = [g.name for g in gens]
        results["primary"] = gens[0].name
        results["vmpool_config"] = VMPOOL_CONFIG
        if baseline:
            results["baseline"] = str(baseline)
        if split:
            results["split"] = "vmpool: --role api + --role reconciler"
        results["floor"] = {
            "free_rows": floor.FREE_ROWS,
            "asyncpg_pool": floor.POOL_SIZE,
            "messages": "protobuf (upb) via grpclib.encoding.proto.ProtoCodec",
        }
        return results
    finally:
        for server in servers:
            server.__exit__()
        if floor_proc is not None:
            floor_proc.terminate()
            try:
                floor_proc.wait(10)
            except subprocess.TimeoutExpired:
                floor_proc.kill()
        floor_pg.stop()
