"""A crash (SIGKILL) in the middle of a burst of Leases and Returns, then a restart
on the same database: no instance leased twice, nothing lost, no VM leaked."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tests.e2e.clients import Client, RpcError
from tests.e2e.conftest import Running
from tests.polling import eventually

POOLS = [
    {"name": "crash", "min_ready": 5, "max_size": 10},
    {"name": "crash2", "min_ready": 3, "max_size": 6},
]


@dataclass
class Record:
    ok: list[tuple[str, str | None]] = field(default_factory=list)  # (instance, rid)
    return_tried: set[str] = field(default_factory=set)
    codes: dict[str, int] = field(default_factory=lambda: defaultdict(int))


async def worker(c: Client, rec: Record, stop: asyncio.Event, seed: int) -> None:
    rnd = random.Random(seed)
    rids: list[tuple[str, str]] = []
    while not stop.is_set():
        pool = rnd.choice(["crash", "crash2"])
        roll = rnd.random()
        rid: str | None = None
        if roll < 0.3:
            rid = str(uuid.uuid4())
            rids.append((rid, pool))
        elif roll < 0.5 and rids:
            rid, pool = rnd.choice(rids)  # a retry, as inctl does
        try:
            lease = await c.lease(pool, reservation_id=rid, timeout=3)
        except RpcError as err:
            rec.codes[err.code] += 1
            await asyncio.sleep(0.02)
            continue
        rec.codes["OK"] += 1
        rec.ok.append((lease.instance, rid))
        if rnd.random() < 0.8:
            rec.return_tried.add(lease.instance)
            try:
                await c.return_(lease.instance)
            except RpcError as err:
                rec.codes[f"Return {err.code}"] += 1


async def test_sigkill_mid_burst_loses_nothing_and_leaks_no_vm(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
) -> None:
    server = await start_server(POOLS, name="crash")
    await server.wait_ready("crash", 5)
    await server.wait_ready("crash2", 3)
    clients = [client_factory(kind, server.address) for kind in ("grpclib", "grpcio")]
    rec = Record()
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(worker(c, rec, stop, seed=i * 2 + j))
        for i, c in enumerate(clients)
        for j in range(4)
    ]
    # A burst under way (however slow the machine), then SIGKILL in the middle of it.
    await eventually(
        lambda: asyncio.sleep(0, rec.codes["OK"]), lambda ok: ok >= 10, 30, "10 leases granted"
    )
    await asyncio.to_thread(server.proc.kill)
    killed_at = time.monotonic()
    await asyncio.sleep(0.3)  # the burst runs on into the dead server
    await asyncio.to_thread(server.proc.start)
    await asyncio.sleep(1.0)  # and on into the restarted one
    stop.set()
    await asyncio.gather(*workers)
    allowed = {
        "OK",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "FAILED_PRECONDITION",
        "DEADLINE_EXCEEDED",
        "Return UNAVAILABLE",
        "Return DEADLINE_EXCEEDED",
        "Return NOT_FOUND",
    }
    assert set(rec.codes) <= allowed, dict(rec.codes)
    assert time.monotonic() - killed_at < 30

    # 1. Every OK answer names a distinct instance, or the same one for retries of
    #    the same reservation.
    holders: dict[str, set[str | None]] = defaultdict(set)
    answers: dict[str, int] = defaultdict(int)
    for instance, rid in rec.ok:
        holders[instance].add(rid)
        answers[instance] += 1
    for instance, rids in holders.items():
        assert None not in rids or answers[instance] == 1, (instance, rids)
        assert len(rids) == 1, f"{instance} leased for different requests: {rids}"

    # 2. The store never shows two leases of one instance.
    twice = await server.sql(
        "SELECT instance, count(*) AS n FROM "
        "(SELECT instance FROM leases UNION ALL SELECT instance FROM lease_history) t "
        "GROUP BY instance HAVING count(*) > 1"
    )
    assert not twice, [dict(r) for r in twice]

    # 3. An OK answer is durable: leases never returned are still there after the crash.
    active = {r["instance"] for r in await server.sql("SELECT instance FROM leases")}
    kept = {instance for instance, _ in rec.ok} - rec.return_tried
    assert kept <= active, f"leases lost in the crash: {kept - active}"

    # 4. A retried reservation after the restart returns the very same lease.
    c = clients[0]
    for instance, rid in rec.ok:
        if rid is not None and instance in active:
            assert (await c.lease("", reservation_id=rid)).instance == instance

    # 5. No VM leaked: every simulated VM has its row and every row its VM, and
    #    nothing is stuck being destroyed.
    async def drift() -> tuple[set[str], set[str], int]:
        vms = {r["name"] for r in await server.sql("SELECT name FROM fake_vms")}
        rows = {r["name"] for r in await server.sql("SELECT name FROM instances")}
        destroying = await server.sql("SELECT 1 FROM instances WHERE state = 'destroying'")
        return vms - rows, rows - vms, len(destroying)

    await eventually(
        drift,
        lambda d: d == (set(), set(), 0),
        15,
        "VMs and rows to match with nothing in destroying",
    )
    server.assert_clean_log()
