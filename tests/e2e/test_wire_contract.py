"""The contract's rows as inctl meets them (lease-api.md sections 1-4): the empty
service_tag is a tag, and an expiry granted as asked comes back to the
nanosecond in every later answer. Through both gRPC stacks; the nanoseconds
through grpcio (protobuf's own Timestamp), as grpc-go reads them."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from tests.e2e.clients import Client, RpcError
from tests.e2e.conftest import Running, lease_when_free
from tests.e2e.grpcio_stack import GrpcioModules

POOLS = [
    {"name": "alpha", "min_ready": 2, "max_size": 4, "default_lease": "30m", "max_lease": "2h"},
]
HOUR_NS = 3600 * 10**9


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[Running]]) -> AsyncIterator[Running]:
    running = await start_server(POOLS, name="contract")
    await running.wait_ready("alpha", 2)
    yield running
    running.assert_clean_log()


async def test_the_empty_service_tag_is_a_tag(client: Client) -> None:
    rid = str(uuid.uuid4())
    lease = await lease_when_free(client, "alpha", service_tag="", reservation_id=rid)
    assert await client.lease("alpha", service_tag="", reservation_id=rid) == lease
    with pytest.raises(RpcError) as err:
        await client.lease("alpha", service_tag="inctl", reservation_id=rid)
    assert err.value.code == "PERMISSION_DENIED"
    with pytest.raises(RpcError) as err:
        await client.return_(lease.instance, "inctl")
    assert err.value.code == "PERMISSION_DENIED", "'inctl' and '' are two different tags"
    extended = await client.extend_to(lease.instance, lease.expires, "", extend_only=True)
    assert extended.instance == lease.instance
    await client.return_(lease.instance, "")


@pytest.fixture
async def stub(server: Running, grpcio_modules: GrpcioModules) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield grpcio_modules.pb2_grpc.VMPoolLeaseServiceStub(channel)


async def test_expiry_round_trips_to_the_nanosecond(
    stub: Any, server: Running, grpcio_modules: GrpcioModules
) -> None:
    pb2 = grpcio_modules.pb2

    def stamp(ns: int) -> Any:
        return grpcio_modules.timestamp_pb2.Timestamp(seconds=ns // 10**9, nanos=ns % 10**9)

    def ns(ts: Any) -> int:
        return int(ts.seconds) * 10**9 + int(ts.nanos)

    await server.wait_ready("alpha", 1)
    asked = time.time_ns() // 1000 * 1000 + HOUR_NS + 789  # not a whole microsecond
    reply = await stub.Lease(pb2.LeaseRequest(pool="alpha", expires=stamp(asked)), timeout=10)
    lease = reply.lease
    assert lease.instance.startswith("vmp-")
    assert ns(lease.expires) == asked
    got = await stub.GetLease(pb2.GetLeaseRequest(instance=lease.instance), timeout=10)
    assert ns(got.lease.expires) == asked

    # inctl vm expire-in: ExtendTo(now + d), compared to the nanosecond.
    to = asked + 123_456_001
    for extend_only in (False, True):
        extended = await stub.ExtendTo(
            pb2.ExtendToRequest(instance=lease.instance, to=stamp(to), extend_only=extend_only),
            timeout=10,
        )
        assert ns(extended.lease.expires) == to
        to += 1  # one nanosecond later is later, even with --extend-only
    unchanged = await stub.ExtendTo(
        pb2.ExtendToRequest(instance=lease.instance, to=stamp(to - 2), extend_only=True),
        timeout=10,
    )
    assert ns(unchanged.lease.expires) == to - 1
    got = await stub.GetLease(pb2.GetLeaseRequest(instance=lease.instance), timeout=10)
    assert ns(got.lease.expires) == to - 1

    # Capped: the answer is the cap (max_lease 2h), not what was asked.
    capped = await stub.ExtendTo(
        pb2.ExtendToRequest(instance=lease.instance, to=stamp(asked + 5 * HOUR_NS)), timeout=10
    )
    assert ns(capped.lease.expires) < asked + 2 * HOUR_NS
    assert ns(capped.lease.expires) % 1000 == 0, "the cap is now + max_lease"
    await stub.Return(pb2.ReturnRequest(instance=lease.instance), timeout=10)


async def test_every_ok_answer_carries_its_lease_as_inctl_sends_requests(
    stub: Any, server: Running, grpcio_modules: GrpcioModules
) -> None:
    """inctl: empty tag, one reservation id reused on every retry, Go's zero time
    for `--duration 0`; an OK without `lease` makes it spin (or panic)."""
    pb2, ts = grpcio_modules.pb2, grpcio_modules.timestamp_pb2
    await server.wait_ready("alpha", 1)
    rid = str(uuid.uuid4())
    zero = ts.Timestamp(seconds=-62135596800)
    first = await stub.Lease(
        pb2.LeaseRequest(pool="alpha", expires=zero, reservation_id=rid), timeout=10
    )
    assert first.HasField("lease") and first.lease.instance.startswith("vmp-")
    default = first.lease.expires.seconds - time.time()
    assert 25 * 60 < default <= 30 * 60 + 5, "Go's zero time means the default lease"
    asked = time.time_ns() + HOUR_NS + 7
    again = await stub.Lease(  # rule 1: the same lease, unchanged, expiry included
        pb2.LeaseRequest(
            pool="alpha",
            expires=ts.Timestamp(seconds=asked // 10**9, nanos=asked % 10**9),
            reservation_id=rid,
        ),
        timeout=10,
    )
    assert again.HasField("lease") and again.lease == first.lease
    soon = ts.Timestamp(seconds=int(time.time()) + 60)
    unchanged = await stub.ExtendTo(  # extend_only, earlier than the lease: unchanged
        pb2.ExtendToRequest(instance=first.lease.instance, to=soon, extend_only=True), timeout=10
    )
    assert unchanged.HasField("lease") and unchanged.lease == first.lease
    for not_given in (zero, ts.Timestamp()):  # Go's zero time, the epoch
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ExtendTo(
                pb2.ExtendToRequest(instance=first.lease.instance, to=not_given), timeout=10
            )
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "to" in (err.value.details() or "")
    await stub.Return(pb2.ReturnRequest(instance=first.lease.instance), timeout=10)
