"""Metrics and logs an operator relies on (operations guide "Metrics" and "Logs"):
the named Prometheus series move under load, and stdout carries one JSON line per
RPC and one per reconciler action."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.ops.conftest import (
    Client,
    OpsServer,
    Outcome,
    Sql,
    ascrape,
    lease_when_free,
    sample,
)
from tests.polling import eventually

BOOT = 0.2  # fake boot_seconds: boot durations are not zero
POOLS = [
    {"name": "load", "min_ready": 3, "max_size": 8, "max_provisioning": 8},
    # Never has a free instance unless a reservation asks for one.
    {"name": "queue", "min_ready": 0, "max_size": 1},
    {"name": "short", "min_ready": 1, "max_size": 2, "default_lease": "1s", "max_lease": "1h"},
]
EXPECTED = {
    # family name (as the parser reports it): (type, label names)
    "vmpool_instances": ("gauge", {"pool", "state"}),
    "vmpool_reservations_queued": ("gauge", {"pool"}),
    "vmpool_reservation_oldest_age_seconds": ("gauge", {"pool"}),
    "vmpool_rpc_requests": ("counter", {"method", "code"}),
    "vmpool_rpc_duration_seconds": ("histogram", {"method"}),
    "vmpool_leases_granted": ("counter", {"pool"}),
    "vmpool_lease_duration_seconds": ("histogram", {"pool", "reason"}),
    "vmpool_reservation_wait_seconds": ("histogram", {"pool"}),
    "vmpool_boot_duration_seconds": ("histogram", {"pool"}),
    "vmpool_reconcile_duration_seconds": ("histogram", set()),
    "vmpool_reconciler_leader": ("gauge", set()),
    "vmpool_build_info": ("gauge", {"version", "python"}),
    "vmpool_pool_min_ready": ("gauge", {"pool"}),
    "vmpool_pool_max_size": ("gauge", {"pool"}),
    "vmpool_lease_wait_seconds": ("histogram", set()),
}
LEASES_EACH = 4  # the load: each worker leases and returns this many times
WORKERS = 4


class Load:
    """What the clients saw, to compare with what the server reports."""

    def __init__(self) -> None:
        self.codes: Counter[tuple[str, str]] = Counter()
        self.leased: list[str] = []
        self.returned: list[str] = []
        self.ready_before: set[str] = set()  # the pool's instances when the load began
        self.ready_after: set[str] = set()  # and once the reconciler caught up


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[OpsServer]]) -> AsyncIterator[OpsServer]:
    s = await start_server(
        POOLS, name="observed", provider={"kind": "fake", "fake": {"boot_seconds": BOOT}}
    )
    yield s
    s.assert_no_traceback()


@pytest.fixture(scope="module")
async def load(server: OpsServer) -> AsyncIterator[tuple[Load, dict[str, Any], dict[str, Any]]]:
    """Short load on pool "load" (Lease, Return, Ping); /metrics before and after."""
    sql = Sql(server.db_url)  # type: ignore[attr-defined]
    await eventually(lambda: sql.counts("load"), lambda c: c.get("ready") == 3, 10, "pool filled")
    before = await ascrape(server.metrics_port)
    seen = Load()
    seen.ready_before = await sql.names("instances", "load")
    client = Client(server.address)

    async def worker() -> None:
        deadline = time.monotonic() + 60  # a bound for a broken server, not a speed target
        leases = 0
        while leases < LEASES_EACH:
            assert time.monotonic() < deadline, f"only {leases} leases in 60 s"
            try:
                lease = await client.lease("load")
            except Outcome as err:
                seen.codes["Lease", err.code] += 1
                await asyncio.sleep(0.05)
            else:
                seen.codes["Lease", "OK"] += 1
                leases += 1
                seen.leased.append(lease.instance)
                await client.return_(lease.instance)
                seen.codes["Return", "OK"] += 1
                seen.returned.append(lease.instance)
            await client.ping()
            seen.codes["Ping", "OK"] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(WORKERS)))
    finally:
        client.close()
    # The reconciler caught up: returned VMs destroyed, the pool refilled and booted.
    await eventually(
        lambda: sql.counts("load"), lambda c: c == {"ready": 3}, 30, "pool settled after the load"
    )
    seen.ready_after = await sql.names("instances", "load")
    after = await ascrape(server.metrics_port)
    yield seen, before, after


def delta(before: dict[str, Any], after: dict[str, Any], name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


async def test_metric_names_follow_prometheus_conventions(server: OpsServer) -> None:
    families = await ascrape(server.metrics_port)
    for name, (kind, labels) in EXPECTED.items():
        assert name in families, f"{name} missing from /metrics"
        fam = families[name]
        assert fam.type == kind, f"{name} is a {fam.type}, expected {kind}"
        assert fam.documentation, f"{name} has no HELP text"
        for s in fam.samples:
            assert set(s.labels) - {"le"} == labels or (not s.labels and not labels), (name, s)
    for fam in families.values():
        # The standard process and platform collectors keep their own names.
        assert re.fullmatch(r"(vmpool|process|python)_[a-z][a-z0-9_]*", fam.name), fam.name
        if fam.type == "counter":
            assert {s.name for s in fam.samples} <= {fam.name + "_total", fam.name + "_created"}
        else:
            assert not fam.name.endswith("_total"), f"{fam.name}: only counters end in _total"
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), f"{fam.name}: histograms here measure time"
        assert not re.search(r"_(ms|milliseconds|minutes|hours)(_|$)", fam.name), fam.name


async def test_rpc_metrics_count_exactly_what_the_clients_saw(load: Any) -> None:
    seen, before, after = load
    assert seen.codes["Lease", "OK"] == WORKERS * LEASES_EACH, seen.codes
    for (method, code), n in seen.codes.items():
        got = delta(before, after, "vmpool_rpc_requests_total", method=method, code=code)
        assert got == n, f"{method} {code}: server counted {got}, clients saw {n}"
        calls = sum(v for (m, _), v in seen.codes.items() if m == method)
        assert delta(before, after, "vmpool_rpc_duration_seconds_count", method=method) == calls
        assert delta(before, after, "vmpool_rpc_duration_seconds_sum", method=method) > 0
    # Buckets are cumulative and end with +Inf == count.
    fam = after["vmpool_rpc_duration_seconds"]
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in fam.samples
        if s.name.endswith("_bucket") and s.labels["method"] == "Lease"
    ]
    values = [v for _, v in sorted(buckets)]
    assert values == sorted(values)
    assert values[-1] == sample(after, "vmpool_rpc_duration_seconds_count", method="Lease")


async def test_lease_metrics_move(load: Any) -> None:
    seen, before, after = load
    ok = seen.codes["Lease", "OK"]
    assert delta(before, after, "vmpool_leases_granted_total", pool="load") == ok
    returned = delta(
        before, after, "vmpool_lease_duration_seconds_count", pool="load", reason="returned"
    )
    assert returned == len(seen.returned)
    assert (
        delta(before, after, "vmpool_lease_duration_seconds_sum", pool="load", reason="returned")
        >= 0
    )


async def test_background_metrics_move(server: OpsServer, load: Any) -> None:
    seen, before, after = load
    assert delta(before, after, "vmpool_reconcile_duration_seconds_count") > 0
    assert sample(after, "vmpool_reconciler_leader") == 1
    # One boot observed for each instance that became ready during the load: each
    # was leased and returned, or is among the ready ones now.
    booted = (set(seen.returned) | seen.ready_after) - seen.ready_before
    boots = delta(before, after, "vmpool_boot_duration_seconds_count", pool="load")
    assert boots == len(booted), (boots, len(booted))
    total = sample(after, "vmpool_boot_duration_seconds_count", pool="load")
    mean = sample(after, "vmpool_boot_duration_seconds_sum", pool="load") / total
    assert BOOT * 0.9 <= mean < 5, mean

    # vmpool_instances follows the database: a held lease shows as leased.
    sql = Sql(server.db_url)  # type: ignore[attr-defined]
    client = Client(server.address)
    try:
        lease = await lease_when_free(client, "load")

        async def gauges() -> tuple[dict[str, float], dict[str, int]]:
            fam = await ascrape(server.metrics_port)
            states = ("provisioning", "ready", "reserved", "leased", "destroying")
            got = {st: sample(fam, "vmpool_instances", pool="load", state=st) for st in states}
            want = {st: float((await sql.counts("load")).get(st, 0)) for st in states}
            return got, want

        await eventually(
            gauges,
            lambda gw: gw[0] == gw[1] and gw[0]["leased"] == 1 and gw[0]["ready"] == 3,
            30,
            "vmpool_instances matching the database: one lease held, refilled",
        )
        await client.return_(lease.instance)
    finally:
        client.close()


async def test_queued_reservation_metrics(server: OpsServer) -> None:
    client = Client(server.address)
    rid = str(uuid.uuid4())
    try:
        before = await ascrape(server.metrics_port)
        with pytest.raises(Outcome) as queued:
            await client.lease("queue", reservation_id=rid)
        assert queued.value.code == "RESOURCE_EXHAUSTED"
        assert "position 1 of 1" in queued.value.message
        fam = await eventually(
            lambda: ascrape(server.metrics_port),
            lambda f: (
                sample(f, "vmpool_reservations_queued", pool="queue") == 1
                and sample(f, "vmpool_reservation_oldest_age_seconds", pool="queue") > 0
            ),
            30,
            "the queued reservation in the gauges",
        )
        assert sample(fam, "vmpool_reservations_queued", pool="load") == 0
        await asyncio.sleep(0.3)
        lease = await client.lease("queue", reservation_id=rid, wait="10s", timeout=15)
        after = await eventually(
            lambda: ascrape(server.metrics_port),
            lambda f: sample(f, "vmpool_reservations_queued", pool="queue") == 0,
            30,
            "the queue gauge back to 0",
        )
        assert delta(before, after, "vmpool_reservation_wait_seconds_count", pool="queue") == 1
        waited = delta(before, after, "vmpool_reservation_wait_seconds_sum", pool="queue")
        assert 0.3 <= waited < 10, waited
        assert sample(after, "vmpool_reservation_oldest_age_seconds", pool="queue") == 0
        assert delta(before, after, "vmpool_leases_granted_total", pool="queue") == 1
        await client.return_(lease.instance)
    finally:
        client.close()


# --- logs ---------------------------------------------------------------------------


def rpc_lines(server: OpsServer, method: str) -> list[dict[str, Any]]:
    return [r for r in server.records() if r.get("event") == "rpc" and r["method"] == method]


async def test_stdout_is_json_lines_with_one_canonical_line_per_rpc(
    server: OpsServer, load: Any
) -> None:
    seen, _, _ = load
    records = server.records()  # fails on any line that is not a JSON object
    assert records
    for r in records:
        assert {"event", "level", "timestamp"} <= r.keys(), r
    leases = rpc_lines(server, "Lease")
    for r in rpc_lines(server, "Lease") + rpc_lines(server, "Return") + rpc_lines(server, "Ping"):
        assert isinstance(r["duration_ms"], int | float) and r["duration_ms"] >= 0, r
        assert re.fullmatch(r"127\.0\.0\.1:\d+", r["peer"]), r
        assert r["level"] == "info", r
    by_instance = Counter(r.get("instance") for r in leases if r["code"] == "OK")
    for instance in seen.leased:
        assert by_instance[instance] >= 1, f"no Lease line names {instance}"
    for r in leases:
        if r["code"] == "OK":
            assert r["pool"] in {"load", "queue", "short"} and r["service_tag"] == "ops", r
            assert r["instance"].startswith("vmp-"), r
    returns = {r["instance"]: r for r in rpc_lines(server, "Return") if r["code"] == "OK"}
    for instance in seen.returned:
        r = returns[instance]
        assert r["pool"] == "load" and r["service_tag"] == "ops", r
    pings = [r for r in rpc_lines(server, "Ping") if r["code"] == "OK"]
    assert len(pings) >= seen.codes["Ping", "OK"]
    # Exactly one line per RPC: as many lines as the server counted calls (no traffic
    # runs between the scrape and the read; each line is flushed as it is written).
    families = await ascrape(server.metrics_port)
    lines = Counter((r["method"], r["code"]) for r in server.records() if r.get("event") == "rpc")
    counted = {
        (s.labels["method"], s.labels["code"]): int(s.value)
        for s in families["vmpool_rpc_requests"].samples
        if s.name == "vmpool_rpc_requests_total"
    }
    assert dict(lines) == counted


async def test_reservation_leases_log_the_reservation(server: OpsServer) -> None:
    client = Client(server.address)
    rid = str(uuid.uuid4())
    try:
        with pytest.raises(Outcome):
            await client.lease("queue", reservation_id=rid)
        lease = await client.lease("queue", reservation_id=rid, wait="10s", timeout=15)
        await client.return_(lease.instance)
    finally:
        client.close()
    lines = [r for r in rpc_lines(server, "Lease") if r.get("reservation") == rid]
    assert [r["code"] for r in lines] == ["RESOURCE_EXHAUSTED", "OK"], lines
    queued, served = lines
    assert queued["pool"] == "queue" and "position 1 of 1" in queued["error"], queued
    assert served["instance"] == lease.instance and served["pool"] == "queue", served
    assert served["service_tag"] == "ops"


async def test_reconciler_actions_are_logged_with_instance_and_reason(
    server: OpsServer, load: Any
) -> None:
    seen, _, _ = load
    sql = Sql(server.db_url)  # type: ignore[attr-defined]
    client = Client(server.address)
    try:
        lease = await lease_when_free(client, "short")  # default_lease 1s: it expires
    finally:
        client.close()

    async def gone() -> bool:
        return not await sql.val("SELECT count(*) FROM instances WHERE name = $1", lease.instance)

    await eventually(gone, bool, 10, "the expired lease's VM destroyed")
    records = server.records()
    expired = [
        r
        for r in records
        if r.get("event") == "lease expired" and r.get("instance") == lease.instance
    ]
    assert len(expired) == 1, expired
    assert expired[0]["pool"] == "short" and expired[0]["reason"], expired
    deleted = [
        r for r in records if r.get("event") == "delete" and r.get("instance") == lease.instance
    ]
    assert len(deleted) == 1 and deleted[0]["reason"] == "lease expired", deleted
    # A returned instance: destroyed with the return as the reason.
    returned = seen.returned[0]
    deleted = [r for r in records if r.get("event") == "delete" and r.get("instance") == returned]
    assert len(deleted) == 1 and deleted[0]["reason"] == "returned", deleted
    # Provisioning and boots are actions too, each naming its instance.
    created = [r for r in records if r.get("event") == "create"]
    ready = [r for r in records if r.get("event") == "ready"]
    assert created and ready
    assert all(r["instance"].startswith("vmp-") and r["pool"] for r in created + ready)


async def test_log_level_warning_suppresses_rpc_lines(
    start_server: Callable[..., Awaitable[OpsServer]],
) -> None:
    quiet = await start_server(
        [{"name": "q", "min_ready": 1, "max_size": 2}], name="quiet", log_level="warning"
    )
    client = Client(quiet.address)
    try:
        assert await client.ping() == "pong"
        lease = await lease_when_free(client, "q")
        await client.return_(lease.instance)
        with pytest.raises(Outcome):
            await client.return_(lease.instance)  # NOT_FOUND: still not an info line
    finally:
        client.close()
    await asyncio.sleep(0.5)  # reconciler actions (delete, create) happen meanwhile
    records = quiet.records()
    assert not [r for r in records if r.get("level") in ("debug", "info")], records[:5]
    assert not [r for r in records if r.get("event") == "rpc"]
    assert quiet.terminate(20) == 0
    # Shutdown's info lines ("shutting down", "stopped") are suppressed too.
    assert not [r for r in quiet.records() if r.get("level") in ("debug", "info")]
    quiet.assert_no_traceback()
