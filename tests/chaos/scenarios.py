"""The five chaos scenarios. Each starts `vmpool serve` on a fresh database, runs a
storm of clients while breaking something, lets the system settle, and checks
every invariant (tests.chaos.invariants)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.chaos import invariants as inv
from tests.chaos.harness import ChaosPostgres, Client, Log, Sampler, Storm, StormConfig, sql
from tests.server import ServerProcess


@dataclass(frozen=True)
class Mode:
    name: str
    storm_seconds: float
    workers: int
    kills: int  # SIGKILLs in scenario (a)
    outage_seconds: float  # PostgreSQL down in scenario (b)
    converge_seconds: float = 45.0


MODES = {
    "quick": Mode("quick", storm_seconds=9, workers=12, kills=2, outage_seconds=3),
    "default": Mode("default", storm_seconds=25, workers=16, kills=4, outage_seconds=5),
    "long": Mode("long", storm_seconds=150, workers=24, kills=12, outage_seconds=8),
}

POOLS: list[dict[str, Any]] = [
    {
        "name": "alpha",
        "min_ready": 2,
        "max_size": 5,
        "max_provisioning": 3,
        "reservation_ttl": "8s",
        "default_lease": "20s",
        "max_lease": "10m",
    },
    {
        "name": "beta",
        "min_ready": 1,
        "max_size": 3,
        "max_provisioning": 2,
        "reservation_ttl": "8s",
        "default_lease": "20s",
        "max_lease": "10m",
    },
]


@dataclass
class Outcome:
    scenario: str
    results: dict[str, inv.Result] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # per-run numbers (failover)


@dataclass
class Context:
    """What a scenario's fault injector gets."""

    server: ServerProcess
    pg: ChaosPostgres
    db_url: str
    log: Log
    mode: Mode
    rng: random.Random
    notes: list[str]
    recovered: inv.Result | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Injector = Callable[[Context, float], Awaitable[None]]
Snapshot = Callable[[Context], Awaitable[inv.Snapshot]]


def server_config(pools: list[dict[str, Any]], provider: dict[str, Any]) -> dict[str, Any]:
    return {
        "reconcile_interval": "0.2s",
        "shutdown_grace": "5s",
        "log_level": "info",
        "provider": provider,
        "pools": pools,
    }


async def fake_snapshot(ctx: Context) -> inv.Snapshot:
    vms = {r["name"] for r in await sql(ctx.db_url, "SELECT name FROM fake_vms")}
    rows = {
        r["name"]: r["state"] for r in await sql(ctx.db_url, "SELECT name, state FROM instances")
    }
    return vms, rows


def count_tracebacks(log: str) -> tuple[int, dict[str, int]]:
    """Tracebacks in a server log: vmpool's own (JSON lines carrying one, or bare
    ones), and those a library's stdlib logger records (a JSON line naming its
    logger, or plain text after its warning; e.g. asyncpg's pool refilling its
    connection floor)."""
    own = 0
    foreign: dict[str, int] = {}
    block = ""  # the plain-text logger line whose traceback we are in
    for line in log.splitlines():
        head = line.split(":", 2)
        if line.startswith("{"):
            block = ""
            if '"exception"' in line and "Traceback" in line:
                logger = str(json.loads(line).get("logger", ""))
                if logger and not logger.startswith("vmpool"):
                    key = f"{logger}: {json.loads(line).get('event', '')[:60]}"
                    foreign[key] = foreign.get(key, 0) + 1
                else:
                    own += 1
        elif len(head) == 3 and head[0] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            block = f"{head[1]}: {head[2][:60]}"
        elif line.startswith("Traceback"):
            if block:
                foreign[block] = foreign.get(block, 0) + 1
            else:
                own += 1
    return own, foreign


def save_calls(log: Log, path: Path) -> None:
    with path.open("w") as f:
        for c in log.calls:
            row = dataclasses.asdict(c)
            row["expires"] = c.expires.isoformat() if c.expires else None
            f.write(json.dumps(row) + "\n")
        for start, end in log.disturbed:
            f.write(json.dumps({"disturbed": [start, end]}) + "\n")


async def wait_ready(db_url: str, pools: list[dict[str, Any]], timeout: float = 120.0) -> None:
    # Generous: with c-provider's 30% boot failures a pool backs off 5 s after
    # each pass that saw one, so filling takes several 5 s steps, more when the
    # machine is slow (a loaded full run missed a 30 s budget).
    deadline = time.monotonic() + timeout
    want = {p["name"]: p["min_ready"] for p in pools}
    while time.monotonic() < deadline:
        rows = await sql(
            db_url, "SELECT pool, count(*) AS n FROM instances WHERE state = 'ready' GROUP BY pool"
        )
        have = {r["pool"]: int(r["n"]) for r in rows}
        if all(have.get(p, 0) >= n for p, n in want.items()):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"pools not filled after {timeout}s")


async def still_serving(ctx: Context, since: float, timeout: float = 30.0) -> inv.Result:
    """Ping OK and a Lease granted (a fresh reservation with x-vmpool-wait) after ``since``."""
    client = Client(ctx.server.address, Log())
    start = time.monotonic()
    try:
        deadline = start + timeout
        ping_ok = None
        while time.monotonic() < deadline:
            if (await client.ping()).code == "OK":
                ping_ok = time.monotonic() - start
                break
            await asyncio.sleep(0.2)
        if ping_ok is None:
            return inv.Result(False, f"Ping not OK within {timeout:.0f}s")
        rid = str(uuid.uuid4())
        while time.monotonic() < deadline:
            call = await client.lease("alpha", rid=rid, wait="5s", timeout=8)
            if call.code == "OK":
                await client.return_(call.instance, "alpha")
                storm_ok = sum(
                    1
                    for c in ctx.log.calls
                    if c.kind == "Lease" and c.code == "OK" and c.t0 > since
                )
                return inv.Result(
                    True,
                    f"Ping OK {ping_ok:.1f}s, Lease OK {time.monotonic() - start:.1f}s after the"
                    f" check began; {storm_ok} storm leases after the fault",
                )
            await asyncio.sleep(0.2)
        return inv.Result(False, f"Ping OK but no Lease within {timeout:.0f}s")
    finally:
        client.close()


async def run(
    name: str,
    pg: ChaosPostgres,
    mode: Mode,
    workdir: Path,
    *,
    provider: dict[str, Any],
    inject: Injector,
    storm: StormConfig | None = None,
    pools: list[dict[str, Any]] | None = None,
    snapshot: Snapshot = fake_snapshot,
    setup: Callable[[Context], Awaitable[None]] | None = None,
    teardown: Callable[[Context], Awaitable[None]] | None = None,
    seed: int = 0,
) -> Outcome:
    started = time.monotonic()
    pools = pools or POOLS
    outcome = Outcome(name)
    db_url = await pg.fresh()
    server = ServerProcess(
        server_config(pools, provider),
        workdir / name,
        database_url=db_url,
        metrics_port=0,
        name="server",
    )
    ctx = Context(server, pg, db_url, Log(), mode, random.Random(seed), outcome.notes)
    if setup is not None:
        await setup(ctx)
    try:
        # The config may carry paths set up above.
        server.config_path.write_text(yaml.safe_dump(server.config))
        await asyncio.to_thread(server.start)
        await wait_ready(db_url, pools)
        config = storm or StormConfig(pools=[p["name"] for p in pools])
        config.workers = mode.workers
        the_storm = Storm(server.address, config, ctx.log, seed=seed)
        sampler = Sampler(db_url)
        sampler.start()
        the_storm.start()
        try:
            await inject(ctx, mode.storm_seconds)
        finally:
            await the_storm.stop()
        save_calls(ctx.log, server.workdir / "calls.jsonl")
        last_fault = max(
            [end for _, end in ctx.log.disturbed] or [time.time() - mode.storm_seconds]
        )
        recovered = ctx.recovered or await still_serving(ctx, last_fault)
        conv = await inv.converged(lambda: snapshot(ctx), mode.converge_seconds)
        await sampler.sample_once()
        await sampler.stop()
        leases = await inv.db_leases(db_url)
        res = outcome.results
        res["no_double_lease"] = inv.no_double_lease(ctx.log, leases)
        res["ok_accounted"] = inv.ok_accounted(ctx.log, leases)
        res["converged"] = conv
        res["fifo"] = inv.fifo(ctx.log, leases, requeued=await inv.requeued(db_url))
        res["pool_size"] = inv.pool_size(sampler, {p["name"]: p["max_size"] for p in pools})
        res["no_internal"] = inv.no_internal(ctx.log)
        res["recovers"] = recovered
        rc = await asyncio.to_thread(server.terminate, 30)
        tracebacks, foreign = count_tracebacks(server.log())
        if foreign:
            outcome.notes.append(
                f"{foreign} tracebacks from library loggers (not JSON): {sorted(foreign)}"
            )
        if rc != 0 or tracebacks:
            res["no_internal"] = inv.Result(
                False,
                f"server exit status {rc} on SIGTERM, {tracebacks} tracebacks in"
                f" {server.log_path}; {res['no_internal'].detail}",
            )
        if sampler.failed:
            outcome.notes.append(f"{sampler.failed} pool-size samples failed (database down)")
    finally:
        server.kill()
        if teardown is not None:
            with contextlib.suppress(Exception):
                await teardown(ctx)
    outcome.seconds = time.monotonic() - started
    return outcome


# --- (a) SIGKILL ----------------------------------------------------------------------


async def inject_kills(ctx: Context, seconds: float) -> None:
    end = time.monotonic() + seconds
    period = seconds / (ctx.mode.kills + 1)
    for _ in range(ctx.mode.kills):
        await asyncio.sleep(period * ctx.rng.uniform(0.6, 1.0))
        t = time.time()
        ctx.server.kill()
        await asyncio.sleep(ctx.rng.uniform(0.2, 1.0))
        await asyncio.to_thread(ctx.server.start)
        ctx.log.disturbed.append((t, time.time() + 1.0))
    ctx.notes.append(f"{ctx.mode.kills} SIGKILLs")
    await asyncio.sleep(max(end - time.monotonic(), 3.0))


async def sigkill(pg: ChaosPostgres, mode: Mode, workdir: Path) -> Outcome:
    return await run(
        "a-sigkill",
        pg,
        mode,
        workdir,
        provider={"kind": "fake", "fake": {"boot_seconds": 0.3}},
        inject=inject_kills,
    )


# --- (b) PostgreSQL stopped and restarted --------------------------------------------------


async def inject_pg_outage(ctx: Context, seconds: float, *, sigkill: bool = False) -> None:
    end = time.monotonic() + seconds
    await asyncio.sleep(seconds / 3)
    pid = ctx.server.proc.pid if ctx.server.proc else None
    client = Client(ctx.server.address, Log())
    t = time.time()
    await asyncio.to_thread(ctx.pg.kill if sigkill else ctx.pg.crash)
    ctx.notes.append("PostgreSQL SIGKILLed" if sigkill else "PostgreSQL stopped -m immediate")
    await asyncio.sleep(0.6)  # past the health check's cache of a good answer
    pings = []
    outage_end = time.monotonic() + ctx.mode.outage_seconds
    while time.monotonic() < outage_end:
        call = await client.ping(timeout=3)
        pings.append((call.code, call.t1 - call.t0))
        await asyncio.sleep(0.3)
    restarting = time.monotonic()
    await asyncio.to_thread(ctx.pg.restart)
    back = time.time()
    ctx.notes.append(f"PostgreSQL restart took {time.monotonic() - restarting:.1f}s")
    ctx.log.disturbed.append((t, back + 1.0))
    unavailable = [p for p in pings if p[0] == "UNAVAILABLE"]
    slow = [d for _, d in pings if d > 2.0]
    ctx.notes.append(
        f"PostgreSQL down {back - t:.1f}s; Pings meanwhile: "
        f"{len(unavailable)}/{len(pings)} UNAVAILABLE, slowest {max(d for _, d in pings):.2f}s"
    )
    storm_codes = {c.code for c in ctx.log.calls if t + 0.5 < c.t0 and c.t1 < back}
    ctx.notes.append(f"storm answers during the outage: {sorted(storm_codes)}")
    result = await still_serving(ctx, back, timeout=40)
    client.close()
    same = (
        ctx.server.proc is not None
        and ctx.server.proc.pid == pid
        and ctx.server.proc.poll() is None
    )
    problems = []
    if not pings or len(unavailable) != len(pings):
        problems.append(f"Ping answers during the outage: {sorted({p[0] for p in pings})}")
    if slow:
        problems.append(f"{len(slow)} Pings took over 2 s")
    if not same:
        problems.append("the vmpool process exited")
    if problems:
        result = inv.Result(False, "; ".join(problems) + f"; {result.detail}")
    ctx.recovered = result
    await asyncio.sleep(max(end - time.monotonic(), 3.0))


async def postgres_outage(pg: ChaosPostgres, mode: Mode, workdir: Path) -> Outcome:
    return await run(
        "b-postgres",
        pg,
        mode,
        workdir,
        provider={"kind": "fake", "fake": {"boot_seconds": 0.3}},
        inject=inject_pg_outage,
    )


async def inject_pg_sigkill(ctx: Context, seconds: float) -> None:
    await inject_pg_outage(ctx, seconds, sigkill=True)


async def postgres_sigkill(pg: ChaosPostgres, mode: Mode, workdir: Path) -> Outcome:
    return await run(
        "f-pg-sigkill",
        pg,
        mode,
        workdir,
        provider={"kind": "fake", "fake": {"boot_seconds": 0.3}},
        inject=inject_pg_sigkill,
    )


# --- (c) provider failures -----------------------------------------------------------------


async def just_storm(ctx: Context, seconds: float) -> None:
    await asyncio.sleep(seconds)


async def provider_failures(pg: ChaosPostgres, mode: Mode, workdir: Path) -> Outcome:
    return await run(
        "c-provider",
        pg,
        mode,
        workdir,
        provider={"kind": "fake", "fake": {"boot_seconds": 0.3, "failure_rate": 0.3}},
        inject=just_storm,
    )


# --- (d) Kubernetes API faults (kubevirt provider, fake API server) ---------------------------

NAMESPACE = "vmpool-chaos"


async def kube_setup(ctx: Context) -> None:
    from tests.fakekube import FakeKube
    from tests.fakekube.schema import CIRROS_EXAMPLE

    fake = FakeKube(boot_step=0.05, delete_delay=0.2, bookmark_interval=0.3)
    for node, zone in (("node-a", "zone-a"), ("node-b", "zone-b")):
        fake.add_node(node, zone)
    await fake.start()
    kubeconfig = fake.write_kubeconfig(ctx.server.workdir / "kubeconfig", namespace=NAMESPACE)
    template = yaml.safe_load(CIRROS_EXAMPLE.read_text())
    ctx.server.config["provider"]["kubevirt"]["kubeconfig"] = str(kubeconfig)
    for pool in ctx.server.config["pools"]:
        pool["template"] = template
    ctx.extra["fake"] = fake


async def kube_teardown(ctx: Context) -> None:
    await ctx.extra["fake"].stop()


async def kube_snapshot(ctx: Context) -> inv.Snapshot:
    from tests.fakekube import VMS

    vms = {o["metadata"]["name"] for o in ctx.extra["fake"].objects(VMS, NAMESPACE)}
    rows = {
        r["name"]: r["state"] for r in await sql(ctx.db_url, "SELECT name, state FROM instances")
    }
    return vms, rows


async def inject_kube_faults(ctx: Context, seconds: float) -> None:
    fake = ctx.extra["fake"]
    end = time.monotonic() + seconds
    faults = [
        ("500s on 30% of writes for 2s", lambda: fake.fail_writes(0.3, 2.0)),
        ("429 for 1.5s", lambda: fake.throttle(seconds=1.5, retry_after=1)),
        ("watches dropped, refused 1s", lambda: fake.drop_watches(refuse_for=1.0)),
        ("resourceVersions expired", lambda: fake.expire_resource_versions(end_watches=True)),
    ]
    done = []
    i = 0
    while time.monotonic() < end - 1.0:
        await asyncio.sleep(ctx.rng.uniform(0.5, 1.5))
        what, fault = faults[i % len(faults)]
        i += 1
        t = time.time()
        fault()
        ctx.log.disturbed.append((t, t + 2.0))
        done.append(what)
    ctx.notes.append(f"{len(done)} API faults: " + ", ".join(sorted(set(done))))
    await asyncio.sleep(max(end - time.monotonic(), 0.5))


async def kube_faults(pg: ChaosPostgres, mode: Mode, workdir: Path) -> Outcome:
    return await run(
        "d-kube",
        pg,
        mode,
        workdir,
        provider={
            "kind": "kubevirt",
            "kubevirt": {
                "namespace": NAMESPACE,
                "kubeconfig": "",
                "deployment": "chaos",
                "qps": 200,
                "burst": 400,
                "orphan_grace": "3s",
            },
        },
        inject=inject_kube_faults,
        snapshot=kube_snapshot,
        setup=kube_setup,
        teardown=kube_teardown,
    )


# --- (e) leases expiring during a storm ---------------------------------------------------------


def expiring_pools() -> list[dict[str, Any]]:
    return [{**p, "default_lease": "2s", "max_lease": "5s"} for p in POOLS]


async def expiry_storm(pg: ChaosPostgres, mode: Mode, workdir: Path) -> Outcome:
    pools = expiring_pools()
    return await run(
        "e-expiry",
        pg,
        mode,
        workdir,
        provider={"kind": "fake", "fake": {"boot_seconds": 0.3}},
        inject=just_storm,
        pools=pools,
        storm=StormConfig(
            pools=[p["name"] for p in pools],
            hold=(0.5, 4.0),
            extend_share=0.5,
            extend_by=(0.5, 4.0),
            abandon_share=0.3,
        ),
    )


SCENARIOS: dict[str, Callable[[ChaosPostgres, Mode, Path], Awaitable[Outcome]]] = {
    "a-sigkill": sigkill,
    "b-postgres": postgres_outage,
    "c-provider": provider_failures,
    "d-kube": kube_faults,
    "e-expiry": expiry_storm,
    "f-pg-sigkill": postgres_sigkill,
}
# Run only in --long mode or when named with --only (CI runs the quick set).
OPT_IN = {"f-pg-sigkill"}
