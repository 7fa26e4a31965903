"""Protocol fuzz: random and mutated protobuf bytes, and random metadata (garbage
x-vmpool-wait included), sent to every RPC of a running `vmpool serve`.

A client's bytes never get UNKNOWN or INTERNAL, the server never crashes, and
Ping still answers afterwards. FUZZ_MESSAGES sets how many (default 2000).
"""

from __future__ import annotations

import asyncio
import os
import random
import string
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from betterproto.lib.google.protobuf import Empty, FieldMask
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

from tests.pg import TestPostgres
from tests.server import ServerProcess
from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.proto.vmpool.admin import v1 as adm

SERVICE = "/intrinsic_proto.vmpoolleaseapi.v1.VMPoolLeaseService"
ADMIN = "/vmpool.admin.v1.VMPoolAdminService"
POOLS = "/intrinsic_proto.vmpoolapi.v1.VMPoolService"
PATHS = {
    **{m: SERVICE for m in ["Ping", "Lease", "Return", "ExtendTo", "Pools", "GetLease"]},
    **{m: ADMIN for m in ["PoolStats", "ListLeases", "ListReservations"]},
    **{
        f"pools.{m}": POOLS
        for m in [
            "CreatePool",
            "UpdatePool",
            "ListPools",
            "DeletePool",
            "StopPool",
            "PausePool",
            "ListLeases",
            "StopLease",
        ]
    },
}
METHODS = list(PATHS)
MESSAGES = int(os.environ.get("FUZZ_MESSAGES", "2000"))
CONCURRENCY = 32
CALL_TIMEOUT = 3.0
FORBIDDEN = {"UNKNOWN", "INTERNAL"}

WAIT_GARBAGE = [
    "",
    " ",
    "abc",
    "-1s",
    "-0s",
    "0",
    "0s",
    "5",
    "1.5s",
    "0.1s",
    "2s",
    "60s",
    "61s",
    "1h",
    "99999999999999999999h",
    "1e309s",
    "nan",
    "NaNs",
    "inf",
    "infs",
    "1s1s",
    "1m30s",
    " 2s",
    "2s ",
    "PT1S",
    "1ms",
    "1us",
    "1ns",
    "0x10s",
    "1_000s",
    "+1s",
    "1.s",
    ".5s",
    "9" * 200,
    "s",
    "h",
    "--",
    "%s",
    "\\x00",
]


class RawCodec(CodecBase):
    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


# --- generators ---------------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def timestamp(rng: random.Random) -> bytes:
    seconds = rng.choice(
        [
            0,
            -62135596800,
            -62135596801,
            253402300799,
            253402300800,
            2**63 - 1,
            -(2**63),
            int(time.time()) + rng.randint(-(10**6), 10**7),
            rng.getrandbits(64),
        ]
    )
    nanos = rng.choice([0, 1, 999_999_999, 1_000_000_000, -1, 2**31 - 1, rng.getrandbits(32)])
    body = b"\x08" + varint(seconds) + b"\x10" + varint(nanos)
    if rng.random() < 0.2:
        body = body[: rng.randrange(len(body) + 1)]
    return body


def text(rng: random.Random) -> str:
    choices = [
        "",
        "alpha",
        "nope",
        "e2e",
        "inctl",
        "vmp-3f30-x9t7q72u",
        str(uuid.uuid4()),
        str(uuid.uuid4()).upper(),
        "a" * 129,
        "tab\there",
        "ünïcödé",
        "\x00\x01",
        "💥" * 10,
        "".join(rng.choice(string.printable) for _ in range(rng.randrange(40))),
    ]
    return rng.choice(choices)


def valid(method: str, rng: random.Random) -> bytes:
    """A well-formed request with random, often wrong, field values."""
    if method in ("Ping", "Pools", "PoolStats"):
        return b""
    if method in ("ListLeases", "ListReservations"):
        return bytes(adm.ListLeasesRequest(pool=text(rng)))
    if method == "pools.CreatePool":
        spec = papi.Spec(runtime=text(rng), intrinsic_os=text(rng), pool_tier=text(rng))
        return bytes(papi.CreatePoolRequest(name=text(rng), spec=spec))
    if method == "pools.UpdatePool":
        mask = FieldMask(paths=[text(rng) for _ in range(rng.randrange(3))])
        name = text(rng)
        return bytes(papi.UpdatePoolRequest(name=name, update_mask=mask)) + b"\x1a\x00"
    if method in ("pools.DeletePool", "pools.StopPool", "pools.PausePool"):
        pool = text(rng)  # never the pool the fuzz leases from
        return bytes(papi.DeletePoolRequest(name=pool if pool != "alpha" else "beta"))
    if method in ("pools.ListLeases", "pools.StopLease"):
        return bytes(papi.StopLeaseRequest(lease_name=text(rng)))
    if method == "pools.ListPools":
        return b""
    if method == "Lease":
        if rng.random() < 0.3:  # a good request: reaches the lease rules and the database
            rid = str(uuid.uuid4()) if rng.random() < 0.5 else None
            return bytes(
                api.LeaseRequest(
                    pool=rng.choice(["alpha", ""]), service_tag="fuzz", reservation_id=rid
                )
            )
        msg = api.LeaseRequest(pool=text(rng), service_tag=text(rng))
        if rng.random() < 0.6:
            msg.reservation_id = text(rng)
        data = bytes(msg)
        if rng.random() < 0.6:
            data += b"\x12" + varint(len(ts := timestamp(rng))) + ts
        return data
    if method == "Return":
        return bytes(api.ReturnRequest(instance=text(rng), service_tag=text(rng)))
    if method == "ExtendTo":
        msg = api.ExtendToRequest(
            instance=text(rng), service_tag=text(rng), extend_only=rng.random() < 0.5
        )
        data = bytes(msg)
        if rng.random() < 0.8:
            data += b"\x12" + varint(len(ts := timestamp(rng))) + ts
        return data
    return bytes(api.GetLeaseRequest(instance=text(rng)))


def random_field(rng: random.Random) -> bytes:
    number = rng.choice([0, 1, 2, 3, 4, 5, 15, 16, 2047, 2**29 - 1, rng.randrange(1, 100)])
    wire = rng.randrange(8)
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(rng.getrandbits(rng.choice([1, 7, 32, 64])))
    if wire == 1:
        return key + rng.randbytes(8)
    if wire == 2:
        body = rng.randbytes(rng.randrange(20))
        length = rng.choice([len(body), len(body) + 5, 2**32, 2**63])
        return key + varint(length) + body
    if wire == 5:
        return key + rng.randbytes(4)
    return key + rng.randbytes(rng.randrange(6))


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif op == 2:
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            buf += random_field(rng)
        elif op == 4 and buf:
            buf.extend(bytes(buf))  # repeated fields: last one wins, or concatenation
        else:
            buf[rng.randrange(len(buf) + 1) :] = b"\xff" * rng.randint(1, 11)
    return bytes(buf)


def payload(method: str, rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        return rng.randbytes(rng.randrange(64))
    if kind < 0.35:
        return b"".join(random_field(rng) for _ in range(rng.randint(1, 5)))
    if kind < 0.55:
        return valid(method, rng)
    return mutate(valid(method, rng), rng)


def sendable(value: str) -> str:
    """grpclib sends only non-empty printable ASCII values."""
    value = "".join(c for c in value if " " <= c <= "~").strip()
    return value or "x"


def metadata(rng: random.Random) -> dict[str, str | bytes]:
    md: dict[str, str | bytes] = {}
    if rng.random() < 0.5:
        md["x-vmpool-wait"] = sendable(
            rng.choice(
                [*WAIT_GARBAGE, "".join(rng.choice(string.printable[:94]) for _ in range(8))]
            )
        )
    if rng.random() < 0.2:
        key = "x-fuzz-" + "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
        md[key] = sendable(text(rng))
    if rng.random() < 0.1:
        md["x-vmpool-wait-bin"] = rng.randbytes(rng.randrange(16))
    return md


# --- the test --------------------------------------------------------------------------------


@pytest.fixture
async def server(postgres: TestPostgres, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    url = await postgres.fresh()
    config = {
        "reconcile_interval": "0.2s",
        "shutdown_grace": "5s",
        "provider": {"kind": "fake", "fake": {"boot_seconds": 0}},
        "pools": [{"name": "alpha", "min_ready": 1, "max_size": 2, "reservation_ttl": "10s"}],
    }
    proc = ServerProcess(config, tmp_path, database_url=url, metrics_port=0, name="fuzz")
    await asyncio.to_thread(proc.start)
    yield proc
    await asyncio.to_thread(proc.__exit__)


async def send(channel: Channel, method: str, data: bytes, md: dict[str, str | bytes]) -> str:
    try:
        async with channel.request(
            f"{PATHS[method]}/{method.removeprefix('pools.')}",
            Cardinality.UNARY_UNARY,
            bytes,
            bytes,
            timeout=CALL_TIMEOUT,
            metadata=md or None,
        ) as stream:
            await stream.send_message(data, end=True)
            await stream.recv_message()
            await stream.recv_trailing_metadata()
        return "OK"
    except GRPCError as err:
        return err.status.name
    except TimeoutError:
        return "DEADLINE_EXCEEDED(client)"


@pytest.mark.timeout(300)
async def test_random_bytes_and_metadata_never_get_internal_errors(
    server: ServerProcess,
) -> None:
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "20260101")))
    host, _, port = server.address.rpartition(":")
    channel = Channel(host, int(port), codec=RawCodec())
    codes: Counter[str] = Counter()
    bad: list[tuple[str, str, bytes, dict[str, Any]]] = []
    cases = []
    for _ in range(MESSAGES):
        method = rng.choice(METHODS)
        cases.append((method, payload(method, rng), metadata(rng)))
    try:
        for start in range(0, len(cases), CONCURRENCY):
            batch = cases[start : start + CONCURRENCY]
            results = await asyncio.gather(*(send(channel, *case) for case in batch))
            for (method, data, md), code in zip(batch, results, strict=True):
                codes[f"{method}:{code}"] += 1
                if code in FORBIDDEN or code.endswith("(client)"):
                    bad.append((code, method, data, md))
            assert server.proc is not None and server.proc.poll() is None, "server died"
    finally:
        channel.close()
    assert not bad, f"{len(bad)} bad answers, first: {bad[:3]}; all codes: {dict(codes)}"
    # Still serving: Ping answers, and no handler crashed.
    ping = Channel(host, int(port))
    try:
        reply = await api.VmPoolLeaseServiceStub(ping).ping(Empty(), timeout=5)
    finally:
        ping.close()
    assert reply.msg
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert '"code": "INTERNAL"' not in log
    # The fuzz reached the handlers, not only the decoder.
    assert codes["Lease:OK"] + codes["Lease:RESOURCE_EXHAUSTED"] > 0, dict(codes)
    assert any(k.endswith(":INVALID_ARGUMENT") for k in codes), dict(codes)
