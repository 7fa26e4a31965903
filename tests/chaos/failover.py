"""Failover scenarios (issue 19): PostgreSQL as a primary and a streaming
standby (tests/chaos/pgcluster.py), two `vmpool serve` replicas on it, a storm
of Lease/Return/ExtendTo from clients of both, and the database broken:

- g-failover: SIGKILL of the primary, `pg_ctl promote` of the synchronous
  standby 1.5 s later; the replicas use a multi-host URL
  (``h1,h2?target_session_attrs=read-write``).
- h-failover-rw: the same, but through one address standing for a `-rw`
  Service that moves to the standby *before* its promotion (a TCP proxy):
  the replicas meet a standby in recovery (LISTEN refused, writes refused).
- i-pg-stall: the primary's address black-holed for a few seconds (the proxy
  holds every byte, closes nothing), then restored.
- j-pg-restart: the primary stopped (-m immediate) and started in place.
- k-failover-async: g-failover with asynchronous replication: the acknowledged
  changes lost are counted, not required to be 0.

Figures per run (Outcome.figures, and docs/chaos.md): seconds without
service, calls per status code, acknowledged changes missing afterwards,
double leases, seconds from promotion (or repair) to the first OK Lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from tests.chaos import invariants as inv
from tests.chaos.harness import ChaosPostgres, Log, Storm, StormConfig, sql
from tests.chaos.pgcluster import PgCluster
from tests.chaos.scenarios import (
    POOLS,
    Mode,
    Outcome,
    count_tracebacks,
    save_calls,
    server_config,
    still_serving,
    wait_ready,
)
from tests.e2e.pgproxy import PgProxy
from tests.server import ServerProcess, json_records

PROMOTE_AFTER = 1.5  # seconds between the primary's death and the promotion
STALL_SECONDS = 6.0
# Tighter than the defaults, as docs/operations.md recommends for HA: a stalled
# statement answers UNAVAILABLE well within the clients' 5 s deadline.
DATABASE = {"connect_timeout": "2s", "command_timeout": "2s", "keepalive": "6s"}
CHANGES = ("Lease", "Return", "ExtendTo", "CancelReservation")


class MovingProxy(PgProxy):
    """A `-rw` Service: one address whose target can move to another server."""

    def move_to(self, url: str) -> None:
        self._target = urllib.parse.urlsplit(url)


@dataclass
class Fault:
    """What an injector did, in wall-clock seconds (time.time())."""

    start: float = 0.0
    repaired: float = 0.0  # promotion done, proxy restored, restart done
    notes: list[str] = field(default_factory=list)


@dataclass
class Rig:
    cluster: PgCluster
    url: str  # what the replicas are given
    proxy: MovingProxy | None = None


Injector = Callable[[Rig, Fault], Awaitable[None]]


# --- the faults ---------------------------------------------------------------------


async def kill_and_promote(rig: Rig, fault: Fault) -> None:
    await asyncio.to_thread(rig.cluster.primary.kill)
    fault.start = time.time()  # every time is counted from the damage done
    await asyncio.sleep(PROMOTE_AFTER)
    await asyncio.to_thread(rig.cluster.standby.promote)
    fault.repaired = time.time()
    fault.notes.append(f"primary SIGKILLed, standby promoted {PROMOTE_AFTER}s later")


async def move_rw_then_promote(rig: Rig, fault: Fault) -> None:
    assert rig.proxy is not None
    await asyncio.to_thread(rig.cluster.primary.kill)
    rig.proxy.move_to(rig.cluster.standby.url())  # still in recovery
    fault.start = time.time()
    await asyncio.sleep(PROMOTE_AFTER)
    await asyncio.to_thread(rig.cluster.standby.promote)
    fault.repaired = time.time()
    fault.notes.append(
        f"primary SIGKILLed, the -rw address moved to the standby in recovery,"
        f" promoted {PROMOTE_AFTER}s later"
    )


async def stall(rig: Rig, fault: Fault) -> None:
    assert rig.proxy is not None
    rig.proxy.set_mode("blackhole")
    fault.start = time.time()
    await asyncio.sleep(STALL_SECONDS)
    rig.proxy.set_mode("pass")
    fault.repaired = time.time()
    fault.notes.append(f"primary's address black-holed for {STALL_SECONDS:g}s")


async def restart_in_place(rig: Rig, fault: Fault) -> None:
    await asyncio.to_thread(rig.cluster.primary.stop, "immediate")
    fault.start = time.time()
    await asyncio.to_thread(rig.cluster.primary.start)
    fault.repaired = time.time()
    fault.notes.append(f"primary restarted in place in {fault.repaired - fault.start:.1f}s")


# --- measuring ----------------------------------------------------------------------


def without_service(log: Log, fault: Fault) -> float | None:
    """From the fault to the first OK answer to a change asked after it."""
    oks = [c.t1 for c in log.calls if c.kind in CHANGES and c.code == "OK" and c.t0 >= fault.start]
    return min(oks) - fault.start if oks else None


def first_lease_after(log: Log, fault: Fault) -> float | None:
    oks = [
        c.t1
        for c in log.calls
        if c.kind == "Lease" and c.code == "OK" and c.t0 >= fault.start and c.t1 >= fault.repaired
    ]
    return min(oks) - fault.repaired if oks else None


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, flags=re.M)
    return float(m.group(1)) if m else 0.0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as reply:
        return str(reply.read().decode())


class LeaderSampler:
    """Sums vmpool_reconciler_leader over the replicas every 0.1 s."""

    def __init__(self, servers: list[ServerProcess]) -> None:
        self.servers = servers
        self.most = 0.0
        self.samples = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            total = 0.0
            for s in self.servers:
                with contextlib.suppress(OSError):
                    total += metric(
                        await asyncio.to_thread(scrape, s.metrics_port), "vmpool_reconciler_leader"
                    )
            self.most = max(self.most, total)
            self.samples += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader-sampler")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


def terms_acquired(logs: list[str]) -> tuple[dict[int, int], list[int]]:
    """From the replicas' logs: how many "leadership acquired" lines each
    replica wrote, and the terms acquired by more than one (must be none)."""
    holders: dict[int, set[int]] = {}
    per_replica: dict[int, int] = {}
    for i, text in enumerate(logs, 1):
        for record in json_records(text.splitlines()):
            if record.get("event") == "leadership acquired":
                holders.setdefault(int(record["term"]), set()).add(i)
                per_replica[i] = per_replica.get(i, 0) + 1
    return per_replica, sorted(t for t, who in holders.items() if len(who) > 1)


async def leader_term(url: str) -> int:
    rows = await sql(url, "SELECT term FROM leader WHERE id = 1")
    return int(rows[0]["term"]) if rows else 0


# --- one run ------------------------------------------------------------------------


async def run_failover(
    name: str,
    mode: Mode,
    workdir: Path,
    inject: Injector,
    *,
    synchronous: bool = True,
    through_proxy: bool = False,
) -> Outcome:
    started = time.monotonic()
    outcome = Outcome(name)
    cluster = await asyncio.to_thread(PgCluster(synchronous=synchronous).start)
    proxy: MovingProxy | None = None
    servers: list[ServerProcess] = []
    try:
        if through_proxy:
            proxy = await MovingProxy(cluster.primary.url()).start()
            url = proxy.url("vmpool")
        else:
            url = cluster.url()
        rig = Rig(cluster, url, proxy)
        checks_url = cluster.url()  # whichever node is writable
        config = {**server_config(POOLS, {"kind": "fake", "fake": {"boot_seconds": 0}})}
        config["database"] = DATABASE
        for i in (1, 2):
            server = ServerProcess(config, workdir / name / f"r{i}", database_url=url, name=f"r{i}")
            server.config_path.write_text(yaml.safe_dump(server.config))
            servers.append(server)
        for server in servers:
            await asyncio.to_thread(server.start)
        await wait_ready(checks_url, POOLS)
        term_before = await leader_term(checks_url)
        log = Log()
        storms = []
        for i, server in enumerate(servers):
            cfg = StormConfig(
                pools=[p["name"] for p in POOLS],
                workers=max(2, mode.workers // 2),
                cancel_share=0.15,
            )
            storms.append(Storm(server.address, cfg, log, seed=i))
        leaders = LeaderSampler(servers)
        leaders.start()
        for storm in storms:
            storm.start()
        fault = Fault()
        try:
            await asyncio.sleep(mode.storm_seconds / 3)
            await inject(rig, fault)
            log.disturbed.append((fault.start, fault.repaired + 1.0))
            await asyncio.sleep(max(mode.storm_seconds * 2 / 3, 8.0))
        finally:
            for storm in storms:
                await storm.stop()
        save_calls(log, servers[0].workdir / "calls.jsonl")
        recovered = await still_serving(
            SimpleNamespace(server=servers[0], log=log),  # type: ignore[arg-type]
            fault.repaired,
        )
        await leaders.stop()
        term_after = await leader_term(checks_url)
        leases = await inv.db_leases(checks_url)
        texts = []
        for s in servers:
            with contextlib.suppress(OSError):
                texts.append(await asyncio.to_thread(scrape, s.metrics_port))
        timeline_changes = sum(metric(t, "vmpool_database_timeline_changes_total") for t in texts)
        read_only = sum(
            float(v)
            for t in texts
            for v in re.findall(
                r"^vmpool_database_read_only_sessions_total\{[^}]*\} (\S+)$", t, re.M
            )
        )
        alive = [f"r{i}" for i, s in enumerate(servers, 1) if s.proc and s.proc.poll() is None]
        res = outcome.results
        res["no_double_lease"] = inv.no_double_lease(log, leases)
        left = {r["id"] for r in await sql(checks_url, "SELECT id::text AS id FROM reservations")}
        acked = inv.acked_kept(log, leases, left)
        res["acked_kept"] = acked if synchronous else inv.Result(None, acked.detail)
        res["no_internal"] = inv.no_internal(log, during_faults=True)
        res["recovers"] = recovered
        acquired, shared = terms_acquired([s.log() for s in servers])
        res["single_leader"] = inv.Result(
            leaders.most <= 1 and term_after >= term_before and not shared,
            f"at most {leaders.most:g} leaders in {leaders.samples} samples of"
            f" vmpool_reconciler_leader; leader term {term_before} -> {term_after};"
            f" terms acquired per replica {acquired}, by two replicas: {shared or 'none'}",
        )
        exits = {}
        tracebacks = 0
        for i, s in enumerate(servers, 1):
            exits[f"r{i}"] = await asyncio.to_thread(s.terminate, 30)
            tracebacks += count_tracebacks(s.log())[0]
        res["replicas_up"] = inv.Result(
            len(alive) == len(servers) and set(exits.values()) == {0} and not tracebacks,
            f"alive after the fault: {alive}; exit status on SIGTERM {exits};"
            f" {tracebacks} tracebacks in their logs",
        )
        missing = acked.detail.split(" missing", 1)[0] if "missing" in acked.detail else "?"
        first = first_lease_after(log, fault)
        outage = without_service(log, fault)
        outcome.figures = {
            "seconds_without_service": None if outage is None else round(outage, 2),
            "calls": log.codes(),
            "acknowledged_missing": missing,
            "double_leases": 0 if res["no_double_lease"].ok else res["no_double_lease"].detail,
            "first_lease_after_repair_s": None if first is None else round(first, 2),
            "timeline_changes_seen": timeline_changes,
            "read_only_sessions_dropped": read_only,
            "deadline_exceeded": sum(1 for c in log.calls if c.code == "DEADLINE_EXCEEDED"),
            "slowest_call_s": round(max((c.t1 - c.t0 for c in log.calls), default=0.0), 2),
        }
        outcome.notes += fault.notes
        outcome.notes.append(f"figures: {outcome.figures}")
    finally:
        for s in servers:
            s.kill()
        if proxy is not None:
            await proxy.close()
        await asyncio.to_thread(cluster.stop)
    outcome.seconds = time.monotonic() - started
    return outcome


def _scenario(
    inject: Injector, **kw: Any
) -> Callable[[ChaosPostgres, Mode, Path], Awaitable[Outcome]]:
    async def scenario(pg: ChaosPostgres, mode: Mode, workdir: Path) -> Outcome:
        return await run_failover(scenario.__name__, mode, workdir, inject, **kw)

    return scenario


def scenarios() -> dict[str, Callable[[ChaosPostgres, Mode, Path], Awaitable[Outcome]]]:
    out = {
        "g-failover": _scenario(kill_and_promote),
        "h-failover-rw": _scenario(move_rw_then_promote, through_proxy=True),
        "i-pg-stall": _scenario(stall, through_proxy=True),
        "j-pg-restart": _scenario(restart_in_place),
        "k-failover-async": _scenario(kill_and_promote, synchronous=False),
    }
    for name, fn in out.items():
        fn.__name__ = name
    return out
