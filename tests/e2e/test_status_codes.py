"""Every row of spec section 2 (inputs and status codes), through both gRPC stacks,
against a real `vmpool serve` process."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.e2e.clients import GO_ZERO, Client, Lease, RpcError
from tests.e2e.conftest import Running, lease_when_free

MIN_SECONDS = -62135596800  # 0001-01-01T00:00:00Z
MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z
NOBODY = "vmp-0000-nobody00"

POOLS = [
    {"name": "alpha", "min_ready": 2, "max_size": 4, "default_lease": "30m", "max_lease": "2h"},
    {"name": "empty", "min_ready": 0, "max_size": 0},
]


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[Running]]) -> AsyncIterator[Running]:
    running = await start_server(POOLS, name="codes")
    await running.wait_ready("alpha", 2)
    yield running
    running.assert_clean_log()


@pytest.fixture
async def leased(client: Client) -> AsyncIterator[Lease]:
    """A lease in pool alpha held by service_tag "owner"; returned afterwards."""
    lease = await lease_when_free(client, "alpha", service_tag="owner")
    yield lease
    try:
        await client.return_(lease.instance, "owner")
    except RpcError as err:
        assert err.code == "NOT_FOUND", err


async def expect(code: str, call: Awaitable[Any], *words: str) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await call
    err = caught.value
    assert err.code == code, f"expected {code}, got {err}"
    for word in words:
        assert word in err.message, f"{word!r} not named in {err.message!r}"
    return err


def future(minutes: float = 10) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


def near(a: datetime, b: datetime, seconds: float = 5.0) -> bool:
    return abs((a - b).total_seconds()) <= seconds


# --- service_tag ----------------------------------------------------------------------

BAD_TAGS = [  # the empty tag is a valid tag: tests/e2e/test_wire_contract.py
    pytest.param("x" * 129, id="129-chars"),
    pytest.param("bad\ttag", id="control-char"),
    pytest.param("caf\u00e9", id="non-ascii"),
]


@pytest.mark.parametrize("tag", BAD_TAGS)
async def test_bad_service_tag_is_invalid_argument_on_lease_return_extend(
    client: Client, tag: str
) -> None:
    await expect("INVALID_ARGUMENT", client.lease("alpha", service_tag=tag), "service_tag")
    await expect("INVALID_ARGUMENT", client.return_(NOBODY, tag), "service_tag")
    await expect("INVALID_ARGUMENT", client.extend_to(NOBODY, future(), tag), "service_tag")


async def test_service_tag_of_128_printable_chars_is_accepted(client: Client) -> None:
    tag = "~ " + "t" * 126
    lease = await lease_when_free(client, "alpha", service_tag=tag)
    assert lease.pool == "alpha"
    await client.return_(lease.instance, tag)


# --- reservation_id -------------------------------------------------------------------


@pytest.mark.parametrize(
    "rid",
    [
        "",
        "not-a-uuid",
        "1b4e28ba-2fa1-11d2-883f-0016d3cca42",
        "1b4e28ba-2fa1-11d2-883f-0016d3cca42g",
    ],
)
async def test_reservation_id_not_a_uuid_is_invalid_argument(client: Client, rid: str) -> None:
    await expect("INVALID_ARGUMENT", client.lease("alpha", reservation_id=rid), "reservation_id")


async def test_uppercase_reservation_id_is_the_same_reservation(client: Client) -> None:
    rid = str(uuid.uuid4())
    first = await lease_when_free(client, "alpha", reservation_id=rid.upper())
    again = await client.lease("alpha", reservation_id=rid.lower())
    assert again == first, "a retry with the lowercase id must return the same lease"
    await client.return_(first.instance, "e2e")


# --- pool and instance ----------------------------------------------------------------


async def test_unknown_pool_is_not_found(client: Client) -> None:
    await expect("NOT_FOUND", client.lease("no-such-pool"), "pool", "no-such-pool")
    await expect(
        "NOT_FOUND",
        client.lease("no-such-pool", reservation_id=str(uuid.uuid4())),
        "pool",
        "no-such-pool",
    )


async def test_empty_instance_is_invalid_argument(client: Client) -> None:
    await expect("INVALID_ARGUMENT", client.return_(""), "instance")
    await expect("INVALID_ARGUMENT", client.extend_to("", future()), "instance")
    await expect("INVALID_ARGUMENT", client.get_lease(""), "instance")


async def test_no_active_lease_is_not_found(client: Client) -> None:
    await expect("NOT_FOUND", client.return_(NOBODY), NOBODY)
    await expect("NOT_FOUND", client.extend_to(NOBODY, future()), NOBODY)
    await expect("NOT_FOUND", client.get_lease(NOBODY), NOBODY)


# --- service_tag ownership ------------------------------------------------------------


async def test_other_service_tag_is_permission_denied(client: Client, leased: Lease) -> None:
    await expect("PERMISSION_DENIED", client.return_(leased.instance, "intruder"), "service_tag")
    await expect(
        "PERMISSION_DENIED",
        client.extend_to(leased.instance, future(60), "intruder"),
        "service_tag",
    )
    # Neither call touched the lease.
    assert await client.get_lease(leased.instance) == leased


async def test_lease_with_another_tags_reservation_is_permission_denied(client: Client) -> None:
    rid = str(uuid.uuid4())
    mine = await lease_when_free(client, "alpha", service_tag="owner", reservation_id=rid)
    await expect(
        "PERMISSION_DENIED",
        client.lease("alpha", service_tag="intruder", reservation_id=rid),
        "service_tag",
    )
    # A queued (not yet served) reservation is protected the same way.
    queued = str(uuid.uuid4())
    await expect(
        "RESOURCE_EXHAUSTED", client.lease("empty", service_tag="owner", reservation_id=queued)
    )
    await expect(
        "PERMISSION_DENIED",
        client.lease("empty", service_tag="intruder", reservation_id=queued),
        "service_tag",
    )
    await client.return_(mine.instance, "owner")


# --- Timestamps -----------------------------------------------------------------------

NOW = int(datetime.now(UTC).timestamp()) + 600
BAD_TIMESTAMPS = [
    pytest.param((MIN_SECONDS - 1, 0), id="before-year-1"),
    pytest.param((MAX_SECONDS + 1, 0), id="after-year-9999"),
    pytest.param((-(2**63), 0), id="int64-min"),
    pytest.param((NOW, -1), id="negative-nanos"),
    pytest.param((NOW, 1_000_000_000), id="nanos-1e9"),
]


@pytest.mark.parametrize("ts", BAD_TIMESTAMPS)
async def test_timestamp_out_of_range_is_invalid_argument_and_server_keeps_serving(
    client: Client, leased: Lease, ts: tuple[int, int]
) -> None:
    await expect("INVALID_ARGUMENT", client.lease("alpha", expires=ts), "expires")
    await expect("INVALID_ARGUMENT", client.extend_to(leased.instance, ts, "owner"), "to")
    assert await client.ping()
    assert await client.get_lease(leased.instance) == leased


async def test_timestamp_at_the_end_of_year_9999_is_valid_and_capped(client: Client) -> None:
    lease = await lease_when_free(client, "alpha", expires=(MAX_SECONDS, 999_999_999))
    assert near(lease.expires, datetime.now(UTC) + timedelta(hours=2)), lease.expires
    await client.return_(lease.instance)


async def test_lease_expires_in_the_past_is_invalid_argument(client: Client) -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    await expect("INVALID_ARGUMENT", client.lease("alpha", expires=past), "expires")
    await expect(
        "INVALID_ARGUMENT",
        client.lease("alpha", expires=past, reservation_id=str(uuid.uuid4())),
        "expires",
    )


@pytest.mark.parametrize(
    "expires",
    [
        pytest.param(None, id="absent"),
        pytest.param(GO_ZERO, id="go-zero-time"),
        pytest.param((0, 0), id="unix-epoch"),
    ],
)
async def test_expires_not_given_means_the_pools_default_lease(
    client: Client, expires: Any
) -> None:
    lease = await lease_when_free(client, "alpha", expires=expires)
    assert near(lease.expires, datetime.now(UTC) + timedelta(minutes=30)), lease.expires
    await client.return_(lease.instance)


@pytest.mark.parametrize(
    "to", [pytest.param(None, id="absent"), pytest.param(GO_ZERO, id="go-zero-time")]
)
async def test_extend_to_without_target_is_invalid_argument(
    client: Client, leased: Lease, to: Any
) -> None:
    await expect("INVALID_ARGUMENT", client.extend_to(leased.instance, to, "owner"), "to")
    await expect(
        "INVALID_ARGUMENT",
        client.extend_to(leased.instance, to, "owner", extend_only=True),
        "to",
    )


async def test_extend_to_the_past(client: Client, leased: Lease) -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    await expect("INVALID_ARGUMENT", client.extend_to(leased.instance, past, "owner"), "to")
    unchanged = await client.extend_to(leased.instance, past, "owner", extend_only=True)
    assert unchanged == leased
    assert await client.get_lease(leased.instance) == leased


# --- capacity -------------------------------------------------------------------------


async def test_no_free_instance_is_resource_exhausted(client: Client) -> None:
    await expect("RESOURCE_EXHAUSTED", client.lease("empty"), "empty")


# --- undecodable requests -------------------------------------------------------------

GARBAGE = [
    pytest.param(b"\xff\xff\xff\xff", id="bad-varint"),
    pytest.param(b"\x0a\x09ab", id="truncated-string"),
    pytest.param(b"\x0a\x02\xff\xfe", id="invalid-utf8"),
    pytest.param(b"\x12\x03\x08\x01", id="truncated-timestamp"),
    pytest.param(b"\x0f", id="bad-wire-type"),
]


@pytest.mark.parametrize("payload", GARBAGE)
@pytest.mark.parametrize("method", ["Lease", "Return", "ExtendTo", "GetLease"])
async def test_garbage_request_bytes_are_invalid_argument(
    client: Client, method: str, payload: bytes
) -> None:
    await expect("INVALID_ARGUMENT", client.raw(method, payload))
    assert await client.ping()


# --- standard health service ----------------------------------------------------------


@pytest.mark.parametrize("service", ["", "intrinsic_proto.vmpoolleaseapi.v1.VMPoolLeaseService"])
async def test_grpc_health_service_reports_serving(server: Running, service: str) -> None:
    from grpclib.client import Channel
    from grpclib.health.v1.health_grpc import HealthStub
    from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    host, _, port = server.address.rpartition(":")
    channel = Channel(host, int(port))
    try:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=5)
    finally:
        channel.close()
    assert reply.status == HealthCheckResponse.SERVING
