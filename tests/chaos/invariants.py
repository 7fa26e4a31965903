"""The invariants checked after every scenario. Each returns a Result: ok (True,
False, or None when it does not apply) and a one-line detail."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tests.chaos.harness import TAG, Call, Log, Sampler, queue_position, sql

INFINITY = float("inf")
FIFO_SLACK = 1.5  # seconds; see docs/chaos.md ("served in enqueue order")

NAMES = {
    "no_double_lease": "no instance leased twice at once",
    "ok_accounted": "every OK Lease is in leases/lease_history",
    "converged": "VMs and rows match once converged",
    "fifo": "reservations served in enqueue order",
    "pool_size": "pool sizes within max_size",
    "no_internal": "no UNKNOWN/INTERNAL answers",
    "recovers": "recovers by itself",
    # Failover scenarios (tests/chaos/failover.py).
    "acked_kept": "every OK change survives",
    "single_leader": "one leader at a time",
    "replicas_up": "replicas survive",
}


@dataclass
class Result:
    ok: bool | None
    detail: str

    @property
    def label(self) -> str:
        return {True: "PASS", False: "FAIL", None: "-"}[self.ok]


def _ts(dt: datetime | None) -> float:
    return dt.timestamp() if dt is not None else INFINITY


async def db_leases(db_url: str) -> list[dict[str, Any]]:
    rows = await sql(
        db_url,
        "SELECT instance, pool, service_tag, reservation_id::text AS rid, leased_at,"
        " expires_at, NULL::timestamptz AS ended_at, NULL AS end_reason FROM leases"
        " UNION ALL SELECT instance, pool, service_tag, reservation_id::text, leased_at,"
        " expires_at, ended_at, end_reason FROM lease_history",
    )
    return [dict(r) for r in rows]


def _overlaps(intervals: list[tuple[float, float, str]]) -> list[str]:
    found = []
    ordered = sorted(intervals)
    for (s1, e1, w1), (s2, e2, w2) in itertools.pairwise(ordered):
        if s2 < e1:
            found.append(f"{w1} [{s1:.3f},{e1:.3f}) overlaps {w2} [{s2:.3f},{e2:.3f})")
    return found


def no_double_lease(log: Log, leases: list[dict[str, Any]]) -> Result:
    """From the client's log: distinct leases of one instance (not retries of one
    reservation) whose known-held intervals overlap. From the database: per
    instance, [leased_at, ended_at) of leases and lease_history never overlap."""
    problems: list[str] = []
    by_instance: dict[str, dict[str, list[Call]]] = {}
    for c in log.calls:
        if c.kind == "Lease" and c.code == "OK":
            identity = c.rid or f"call@{c.t0:.6f}/{c.worker}"
            by_instance.setdefault(c.instance, {}).setdefault(identity, []).append(c)
    ends: dict[str, list[Call]] = {}
    for c in log.calls:
        if c.kind in ("Return", "ExtendTo"):
            ends.setdefault(c.instance, []).append(c)
    relet = 0
    for instance, identities in by_instance.items():
        if len(identities) < 2:
            continue
        relet += 1
        intervals = []
        for identity, answers in identities.items():
            start = min(a.t1 for a in answers)
            expiry = max(_ts(a.expires) for a in answers)
            returns = []
            for e in ends.get(instance, []):
                if e.t0 < start:
                    continue
                if e.kind == "ExtendTo" and e.code == "OK":
                    expiry = max(expiry, _ts(e.expires))
                elif e.kind == "Return":
                    returns.append(e.t0)  # the lease may end from here on
            end = min([expiry, *returns])
            intervals.append((start, end, identity))
        problems += [f"client log {instance}: {p}" for p in _overlaps(intervals)]
    per_instance: dict[str, list[tuple[float, float, str]]] = {}
    for row in leases:
        per_instance.setdefault(row["instance"], []).append(
            (row["leased_at"].timestamp(), _ts(row["ended_at"]), f"lease {row['rid'] or '-'}")
        )
    db_relet = sum(1 for v in per_instance.values() if len(v) > 1)
    problems += [f"db {i}: {p}" for i, v in per_instance.items() for p in _overlaps(v)]
    ok_leases = sum(len(v) for ids in by_instance.values() for v in ids.values())
    detail = (
        f"{ok_leases} OK Lease answers, {len(per_instance)} instances ever leased,"
        f" re-leased instances: client {relet}, db {db_relet}"
    )
    if problems:
        return Result(False, f"{len(problems)} overlaps, e.g. {problems[0]}; {detail}")
    return Result(True, detail)


def ok_accounted(log: Log, leases: list[dict[str, Any]]) -> Result:
    index = {(r["instance"], r["rid"]) for r in leases if r["service_tag"] == TAG}
    by_instance = {r["instance"] for r in leases if r["service_tag"] == TAG}
    ended = [r for r in leases if r["ended_at"] is not None]
    reasons: dict[str, int] = {}
    for r in ended:
        reasons[r["end_reason"]] = reasons.get(r["end_reason"], 0) + 1
    missing = []
    n = 0
    for c in log.calls:
        if c.kind != "Lease" or c.code != "OK":
            continue
        n += 1
        key = (c.instance, c.rid) if c.rid else None
        if (key is not None and key not in index) or (
            key is None and c.instance not in by_instance
        ):
            missing.append(f"{c.instance} rid={c.rid}")
    bad_reasons = [r for r in reasons if not r]
    detail = f"{n} OK answers; ended: {reasons or 'none'}; active: {len(leases) - len(ended)}"
    if missing or bad_reasons:
        return Result(False, f"{len(missing)} not found, e.g. {missing[:3]}; {detail}")
    return Result(True, detail)


async def requeued(db_url: str) -> dict[str, float]:
    """Reservation id -> when it last joined its pool's queue, for those that
    joined more than once: it left the queue (expired: its client could not
    renew it in time, e.g. while the server was down) and its client's next
    call queued it again, at the back."""
    rows = await sql(
        db_url,
        "SELECT reservation_id::text AS rid, max(at) AS at FROM lease_events"
        " WHERE kind = 'reservation_queued' GROUP BY reservation_id HAVING count(*) > 1",
    )
    return {r["rid"]: r["at"].timestamp() for r in rows}


def fifo(
    log: Log,
    leases: list[dict[str, Any]],
    slack: float = FIFO_SLACK,
    requeued: dict[str, float] | None = None,
) -> Result:
    """Reservations served from the queue got leased_at in enqueue order (within
    ``slack``), for pairs whose enqueue order the client saw unambiguously.
    ``requeued`` (see requeued()): a reservation queued again is judged from
    the call that queued it again, not from its first, lapsed place."""
    leased_at = {r["rid"]: r["leased_at"].timestamp() for r in leases if r["rid"]}
    again = requeued or {}
    queued: dict[str, dict[str, Any]] = {}  # rid -> {pool, t0, t1, pos, served}
    for c in sorted(log.calls, key=lambda c: c.t1):
        if c.kind != "Lease" or not c.rid:
            continue
        entry = queued.get(c.rid)
        if entry is not None and entry["t1"] < again.get(c.rid, 0.0) <= c.t1:
            # The first answer since it joined the queue again (an OK one too:
            # a waiting Lease can queue and be served in one call).
            entry = {"pool": c.pool, "t0": c.t0, "t1": c.t1, "pos": None, "ok": False}
            queued[c.rid] = entry
        if c.code == "RESOURCE_EXHAUSTED":
            pos = queue_position(c.message)
            if pos is None:
                continue
            if entry is None or (entry["pos"] is not None and pos > entry["pos"]):
                # First time queued, or queued again (it expired meanwhile).
                queued[c.rid] = {"pool": c.pool, "t0": c.t0, "t1": c.t1, "pos": pos, "ok": False}
            else:
                entry["pos"] = pos
        elif c.code == "OK" and entry is not None:
            entry["ok"] = True
    served = [(rid, e) for rid, e in queued.items() if e["ok"] and rid in leased_at]
    pairs = violations = 0
    examples = []
    for pool in {e["pool"] for _, e in served}:
        items = sorted(((e["t1"], e["t0"], rid) for rid, e in served if e["pool"] == pool))
        for i, (a_t1, _, a) in enumerate(items):
            for _, b_t0, b in items[i + 1 :]:
                if not a_t1 < b_t0:
                    continue
                pairs += 1
                if leased_at[a] > leased_at[b] + slack:
                    violations += 1
                    if len(examples) < 2:
                        examples.append(
                            f"{pool}: {a[:8]} enqueued first, leased "
                            f"{leased_at[a] - leased_at[b]:.2f}s after {b[:8]}"
                        )
    detail = f"{len(served)} served from the queue, {pairs} ordered pairs checked"
    if violations:
        return Result(False, f"{violations} out of order, e.g. {examples}; {detail}")
    return Result(True if pairs else None, detail)


def pool_size(sampler: Sampler, max_sizes: dict[str, int]) -> Result:
    over = {p: n for p, n in sampler.max_seen.items() if n > max_sizes.get(p, 0)}
    detail = f"max seen {sampler.max_seen} (limits {max_sizes}), {sampler.samples} samples"
    if over:
        return Result(False, f"over max_size: {over}; {detail}")
    return Result(True if sampler.samples else None, detail)


def no_internal(log: Log, *, during_faults: bool = False) -> Result:
    """``during_faults``: also inside the windows where something was broken
    (a database failover must answer UNAVAILABLE, never INTERNAL)."""

    def disturbed(c: Call) -> bool:
        if during_faults:
            return False
        return any(c.t0 <= end and c.t1 >= start for start, end in log.disturbed)

    bad = [c for c in log.calls if c.code in ("UNKNOWN", "INTERNAL") and not disturbed(c)]
    if bad:
        c = bad[0]
        return Result(False, f"{len(bad)} calls, e.g. {c.kind} {c.code} {c.message[:120]!r}")
    return Result(True, f"{len(log.calls)} calls: {log.codes()}")


Snapshot = tuple[set[str], dict[str, str]]  # VM names, row name -> state


async def converged(snapshot: Callable[[], Awaitable[Snapshot]], timeout: float) -> Result:
    """Wait (bounded) until every VM has a row, every live row (ready, reserved,
    leased) has a VM, and nothing is left in destroying."""
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    while True:
        vms, rows = await snapshot()
        orphans = vms - set(rows)
        live = {n for n, s in rows.items() if s in ("ready", "reserved", "leased")}
        lost = live - vms
        destroying = {n for n, s in rows.items() if s == "destroying"}
        if not orphans and not lost and not destroying:
            took = time.monotonic() - start
            return Result(True, f"{len(vms)} VMs, {len(rows)} rows, converged in {took:.1f}s")
        if time.monotonic() > deadline:
            return Result(
                False,
                f"after {timeout:.0f}s: VMs without row {sorted(orphans)[:3]} ({len(orphans)}),"
                f" live rows without VM {sorted(lost)[:3]} ({len(lost)}),"
                f" destroying {len(destroying)}",
            )
        await asyncio.sleep(0.5)


def acked_kept(
    log: Log, leases: list[dict[str, Any]], reservations: set[str] | None = None
) -> Result:
    """Every change answered OK is in the database afterwards (on the new
    primary after a failover): an OK Lease has its row (active or ended), an
    OK Return's lease has ended, the last ExtendTo of a lease, when OK, left
    its expiry there, and a reservation CancelReservation answered
    "cancelled" is neither still queued (``reservations``: the ids left) nor
    ever leased. ExtendTos followed by one whose answer was lost (it may or
    may not have applied) are not judged."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in leases:
        rows.setdefault(r["instance"], []).append(r)
    missing: list[str] = []
    counted = {"Lease": 0, "Return": 0, "ExtendTo": 0, "CancelReservation": 0}
    leased_rids = {r["rid"] for r in leases if r["rid"]}
    for c in log.calls:
        if c.kind == "CancelReservation" and c.code == "OK" and c.message == "cancelled":
            counted["CancelReservation"] += 1
            if c.rid in leased_rids or (reservations is not None and c.rid in reservations):
                missing.append(f"CancelReservation {c.rid}: the reservation lived on")
    ok_leases = ok_accounted(log, leases)
    if ok_leases.ok is False:
        missing.append(f"Lease: {ok_leases.detail}")
    counted["Lease"] = sum(1 for c in log.calls if c.kind == "Lease" and c.code == "OK")
    extends: dict[tuple[str, float], list[Call]] = {}
    for c in log.calls:
        if c.kind not in ("Return", "ExtendTo"):
            continue
        held = [r for r in rows.get(c.instance, []) if r["leased_at"].timestamp() <= c.t0]
        if not held:
            if c.code == "OK":
                missing.append(f"{c.kind} {c.instance}: no lease row")
            continue
        row = max(held, key=lambda r: r["leased_at"])
        if c.kind == "Return" and c.code == "OK":
            counted["Return"] += 1
            if row["ended_at"] is None:
                missing.append(f"Return {c.instance}: lease still active")
        elif c.kind == "ExtendTo":
            extends.setdefault((c.instance, row["leased_at"].timestamp()), []).append(c)
    by_key = {(r["instance"], r["leased_at"].timestamp()): r for r in leases}
    for key, calls in extends.items():
        last = max(calls, key=lambda c: c.t0)
        if last.code != "OK" or last.expires is None:
            continue
        counted["ExtendTo"] += 1
        stored = by_key[key]["expires_at"].timestamp()
        if abs(stored - last.expires.timestamp()) > 0.001:
            missing.append(
                f"ExtendTo {key[0]}: expires {stored:.3f}, answered {_ts(last.expires):.3f}"
            )
    detail = f"OK answers checked: {counted}"
    if missing:
        return Result(False, f"{len(missing)} missing, e.g. {missing[:3]}; {detail}")
    return Result(True, f"0 missing; {detail}")
