"""Lease, reservation, Return, ExtendTo and Pools behaviour (spec sections 3 and 4)
through both gRPC stacks against a real `vmpool serve` process."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.clients import Client, RpcError, rpc_code
from tests.e2e.conftest import Running, lease_when_free
from tests.polling import eventually

# Deliberately not in name order: Pools must sort them.
POOLS = [
    {"name": "short", "min_ready": 1, "max_size": 2, "default_lease": "2s", "max_lease": "1h"},
    {
        "name": "beta",
        "min_ready": 1,
        "max_size": 2,
        "zone": "beta-zone",
        "labels": {"zeta": "last", "arch": "x86", "os": "cirros"},
    },
    {"name": "clamp", "min_ready": 1, "max_size": 2, "default_lease": "10m", "max_lease": "1h"},
    {
        "name": "capped",
        "min_ready": 1,
        "max_size": 2,
        "default_lease": "10m",
        "max_lease": "2h",
        "max_lifetime": "30m",
    },
    {"name": "ret", "min_ready": 1, "max_size": 2},
    {"name": "queue", "min_ready": 0, "max_size": 0},
    {"name": "fifo", "min_ready": 2, "max_size": 2, "default_lease": "20m"},
    {"name": "waitpool", "min_ready": 1, "max_size": 1},
    {"name": "burst", "min_ready": 3, "max_size": 3},
]
FAKE_ZONES = {"fake-zone-a", "fake-zone-b", "fake-zone-c"}


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[Running]]) -> AsyncIterator[Running]:
    # A waiting Lease re-reads its reservation once an hour here: only the wake-up
    # when its VM is assigned (or its wait running out) can answer it in time.
    running = await start_server(POOLS, name="leasing", limits={"wait_recheck": "1h"})
    yield running
    running.assert_clean_log()


def near(a: datetime, b: datetime, seconds: float = 5.0) -> bool:
    return abs((a - b).total_seconds()) <= seconds


def now() -> datetime:
    return datetime.now(UTC)


async def vm_gone(server: Running, instance: str) -> bool:
    vms = await server.sql("SELECT 1 FROM fake_vms WHERE name = $1", instance)
    rows = await server.sql("SELECT 1 FROM instances WHERE name = $1", instance)
    return not vms and not rows


# --- Pools ----------------------------------------------------------------------------


async def test_pools_are_sorted_by_name_with_labels_sorted_by_key(client: Client) -> None:
    assert await client.pools() == [
        ("beta", [("arch", "x86"), ("os", "cirros"), ("zeta", "last")]),
        ("burst", []),
        ("capped", []),
        ("clamp", []),
        ("fifo", []),
        ("queue", []),
        ("ret", []),
        ("short", []),
        ("waitpool", []),
    ]


# --- expiry and zone ------------------------------------------------------------------


async def test_lease_expiry_is_kept_or_cut_to_max_lease(client: Client) -> None:
    asked = now() + timedelta(minutes=20)
    kept = await lease_when_free(client, "clamp", expires=asked)
    assert near(kept.expires, asked, 1), "an expiry within max_lease is kept"
    assert kept.zone in FAKE_ZONES, "zone as reported by the provider"
    await client.return_(kept.instance)

    cut = await lease_when_free(client, "clamp", expires=now() + timedelta(hours=5))
    assert near(cut.expires, now() + timedelta(hours=1)), cut.expires
    await client.return_(cut.instance)


async def test_zone_comes_from_the_pool_config(client: Client) -> None:
    lease = await lease_when_free(client, "beta")
    assert lease.zone == "beta-zone"
    assert (await client.get_lease(lease.instance)).zone == "beta-zone"
    await client.return_(lease.instance)


async def test_extend_to_with_and_without_extend_only(client: Client) -> None:
    lease = await lease_when_free(client, "clamp")
    assert near(lease.expires, now() + timedelta(minutes=10)), "default_lease 10m"

    # Asked-for times are kept as asked (not recomputed from when the answer came).
    asked = now() + timedelta(minutes=30)
    longer = await client.extend_to(lease.instance, asked)
    assert near(longer.expires, asked, 0.01)

    capped = await client.extend_to(lease.instance, now() + timedelta(hours=5))
    assert near(capped.expires, now() + timedelta(hours=1)), "cut to now + max_lease"

    asked = now() + timedelta(minutes=5)
    shorter = await client.extend_to(lease.instance, asked)
    assert near(shorter.expires, asked, 0.01), "shortening is allowed"

    kept = await client.extend_to(lease.instance, now() + timedelta(minutes=3), extend_only=True)
    assert kept.expires == shorter.expires, "extend_only never shortens"

    asked = now() + timedelta(minutes=20)
    later = await client.extend_to(lease.instance, asked, extend_only=True)
    assert near(later.expires, asked, 0.01)
    assert (await client.get_lease(lease.instance)).expires == later.expires
    await client.return_(lease.instance)


async def test_max_lifetime_caps_lease_and_extension(client: Client) -> None:
    start = now()
    lease = await lease_when_free(client, "capped", expires=now() + timedelta(hours=1))
    assert near(lease.expires, start + timedelta(minutes=30)), "leased_at + max_lifetime"
    extended = await client.extend_to(lease.instance, now() + timedelta(minutes=90))
    assert near(extended.expires, start + timedelta(minutes=30)), extended.expires
    assert extended.expires <= lease.expires + timedelta(seconds=1)
    await client.return_(lease.instance)


# --- Return ---------------------------------------------------------------------------


async def test_return_ends_the_lease_destroys_the_vm_and_the_pool_refills(
    client: Client, server: Running
) -> None:
    lease = await lease_when_free(client, "ret")
    await client.return_(lease.instance)
    assert await rpc_code(client.return_(lease.instance)) == "NOT_FOUND"
    assert await rpc_code(client.get_lease(lease.instance)) == "NOT_FOUND"
    assert await rpc_code(client.extend_to(lease.instance, now() + timedelta(hours=1))) == (
        "NOT_FOUND"
    )
    await eventually(lambda: vm_gone(server, lease.instance), bool, 30, "the VM destroyed")
    # The pool refills, and the returned instance is never handed out again.
    seen = set()
    for _ in range(2):
        again = await lease_when_free(client, "ret")
        seen.add(again.instance)
    assert lease.instance not in seen
    for name in seen:
        await client.return_(name)


# --- reservations ---------------------------------------------------------------------

QUEUED = re.compile(
    r"reservation (?P<rid>[0-9a-f-]{36}) is queued at position (?P<p>\d+) of (?P<n>\d+) "
    r'in pool "(?P<pool>[a-z0-9-]+)"'
)


async def queue_place(client: Client, pool: str, rid: str, **kw: object) -> tuple[int, int]:
    with pytest.raises(RpcError) as caught:
        await client.lease(pool, reservation_id=rid, **kw)  # type: ignore[arg-type]
    assert caught.value.code == "RESOURCE_EXHAUSTED", caught.value
    m = QUEUED.search(caught.value.message)
    assert m, f"no queue position in {caught.value.message!r}"
    assert m["rid"] == rid.lower() and m["pool"] == pool
    return int(m["p"]), int(m["n"])


async def test_resource_exhausted_message_gives_the_queue_position(client: Client) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    p1, n1 = await queue_place(client, "queue", first)
    assert p1 == n1, "a new reservation joins at the end"
    assert await queue_place(client, "queue", second) == (p1 + 1, n1 + 1)
    assert await queue_place(client, "queue", first) == (p1, n1 + 1), "a retry keeps its place"
    # A request without a reservation is not remembered.
    assert await rpc_code(client.lease("queue")) == "RESOURCE_EXHAUSTED"
    assert await queue_place(client, "queue", second) == (p1 + 1, n1 + 1)


async def test_fifo_reservations_are_served_in_enqueue_order(
    client: Client, server: Running
) -> None:
    await server.wait_ready("fifo", 2)
    held = [await client.lease("fifo"), await client.lease("fifo")]
    rids = [str(uuid.uuid4()) for _ in range(3)]
    for i, rid in enumerate(rids):
        assert await queue_place(client, "fifo", rid) == (i + 1, i + 1)
    assert await rpc_code(client.lease("fifo")) == "RESOURCE_EXHAUSTED"

    jumped: list[str] = []
    hammering = True

    async def hammer() -> None:
        # Requests without a reservation, as fast as they go: none may take an
        # instance while reservations wait.
        while hammering:
            try:
                jumped.append((await client.lease("fifo")).instance)
            except RpcError as err:
                assert err.code == "RESOURCE_EXHAUSTED", err

    for turn, rid in enumerate(rids):
        # Free one instance: the pool (max_size 2) destroys it and provisions another.
        returned = held.pop(0)
        hammering = True
        hammers = [asyncio.create_task(hammer()) for _ in range(3)]
        await client.return_(returned.instance)
        deadline = time.monotonic() + 10
        while True:
            # Later reservations ask first; they must not get the instance.
            for later in reversed(rids[turn + 1 :]):
                assert await rpc_code(client.lease("fifo", reservation_id=later)) == (
                    "RESOURCE_EXHAUSTED"
                ), f"reservation {rids.index(later) + 1} jumped the queue"
            assert not jumped, f"Leases without reservation jumped the queue: {jumped}"
            try:
                lease = await client.lease("fifo", reservation_id=rid)
                break
            except RpcError as err:
                assert err.code == "RESOURCE_EXHAUSTED", err
                assert time.monotonic() < deadline, f"reservation {turn + 1} never served"
                await asyncio.sleep(0.05)
        hammering = False
        await asyncio.gather(*hammers)
        assert not jumped, f"Leases without reservation jumped the queue: {jumped}"
        assert lease.instance != returned.instance
        assert near(lease.expires, now() + timedelta(minutes=20)), "expiry counted from now"
        # An idempotent retry returns the same lease unchanged.
        assert await client.lease("fifo", reservation_id=rid) == lease
        assert await client.lease("fifo", reservation_id=rid.upper()) == lease
        held.append(lease)
    assert len({lease.instance for lease in held}) == 2
    for lease in held:
        await client.return_(lease.instance)


async def test_wait_metadata_holds_a_reservation_lease_until_an_instance_appears(
    client: Client, server: Running
) -> None:
    await server.wait_ready("waitpool", 1)
    blocker = await client.lease("waitpool")
    rid = str(uuid.uuid4())
    waiting = asyncio.create_task(
        client.lease("waitpool", reservation_id=rid, wait="60s", timeout=90)
    )

    async def queued() -> list[object]:
        return [*await server.sql("SELECT 1 FROM reservations WHERE id = $1", uuid.UUID(rid))]

    await eventually(queued, bool, 30, "the waiting call's reservation")
    assert not waiting.done(), "answered while no instance was free"
    await client.return_(blocker.instance)
    # Without the wake-up it would answer after 60 s (its wait), with its queue place.
    lease = await asyncio.wait_for(waiting, 30)
    assert lease.pool == "waitpool" and lease.instance != blocker.instance
    assert await client.lease("waitpool", reservation_id=rid) == lease
    await client.return_(lease.instance)


async def test_wait_metadata_runs_out_with_the_queue_position(client: Client) -> None:
    """The wait ends when it says (the recheck is an hour away): not sooner, and
    with the queue place rather than the call's own 30 s deadline."""
    start = time.monotonic()
    assert await queue_place(client, "queue", str(uuid.uuid4()), wait="1s", timeout=30) >= (1, 1)
    assert time.monotonic() - start >= 1.0, "answered before its wait ran out"


async def test_wait_metadata_is_ignored_without_reservation(client: Client) -> None:
    # Had it waited, the call's 10 s deadline would end it (DEADLINE_EXCEEDED).
    assert await rpc_code(client.lease("queue", wait="60s", timeout=10)) == "RESOURCE_EXHAUSTED"


# --- expiry ---------------------------------------------------------------------------


async def test_an_expired_lease_ends_and_its_vm_is_destroyed(
    client: Client, server: Running
) -> None:
    before = now()
    lease = await lease_when_free(client, "short")
    # default_lease 2 s from when it was granted (however long the call took)
    assert before + timedelta(seconds=2) <= lease.expires <= now() + timedelta(seconds=2)
    assert await client.get_lease(lease.instance) == lease

    async def ended() -> str:
        return await rpc_code(client.get_lease(lease.instance))

    await eventually(ended, lambda code: code == "NOT_FOUND", 30, "the lease to expire")
    assert now() >= lease.expires
    assert await rpc_code(client.return_(lease.instance)) == "NOT_FOUND"
    await eventually(lambda: vm_gone(server, lease.instance), bool, 30, "the VM destroyed")


# --- concurrency ----------------------------------------------------------------------


async def test_concurrent_leases_never_hand_out_an_instance_twice(
    client: Client, server: Running
) -> None:
    await server.wait_ready("burst", 3)

    async def one() -> str:
        try:
            return (await client.lease("burst")).instance
        except RpcError as err:
            return err.code

    results = await asyncio.gather(*(one() for _ in range(20)))
    won = [r for r in results if r.startswith("vmp-")]
    assert len(won) == 3, results
    assert len(set(won)) == 3, f"an instance was leased twice: {results}"
    assert sorted(set(results) - set(won)) == ["RESOURCE_EXHAUSTED"], results
    for name in won:
        await client.return_(name)
