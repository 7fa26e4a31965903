"""`python -m tests.bench.micro`: per-message codec and per-line log costs on one
core (timeit, best of 5), the figures behind docs/performance.md's lever table."""

from __future__ import annotations

import os
import tempfile
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from tests.bench.auth import service_account_token
from tests.bench.floor import generate_stubs, load_messages
from vmpool.auth.tokens import bearer_token
from vmpool.core.instant import Instant
from vmpool.ops import logs
from vmpool.ops.metrics import Metrics
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.proto.vmpool.admin import v1 as adm
from vmpool.wire import fastwire
from vmpool.wire.codec import PONG, SafeProtoCodec

EXPIRES = datetime(2027, 1, 1, tzinfo=UTC)


def micros(fn: Callable[[], Any], n: int = 3000) -> float:
    return round(min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6, 2)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate_stubs(Path(tmp))
        pb = load_messages(Path(tmp))
        raw = bytes(api.LeaseRequest(pool="bench", service_tag="bench"))
        decode = fastwire.decoder(api.LeaseRequest)
        assert decode is not None
        instant = Instant.from_datetime(EXPIRES)
        ts = pb.google_dot_protobuf_dot_timestamp__pb2.Timestamp()
        ts.FromDatetime(EXPIRES)
        print(
            "LeaseRequest decode, µs: betterproto",
            micros(lambda: api.LeaseRequest().parse(raw)),
            "fastwire",
            micros(lambda: decode(raw)),
            "upb",
            micros(lambda: pb.LeaseRequest.FromString(raw)),
        )
        lease = {"instance": "vmp-bench-0001", "pool": "bench", "zone": "fake-zone-a"}
        print(
            "LeaseResponse build+encode, µs: betterproto",
            micros(lambda: bytes(api.LeaseResponse(lease=api.Lease(expires=EXPIRES, **lease)))),
            "fastwire",
            micros(
                lambda: fastwire.encode_lease_reply(
                    fastwire.LeaseReply(lease["instance"], lease["pool"], instant, lease["zone"])
                )
            ),
            "upb",
            micros(
                lambda: pb.LeaseResponse(lease=pb.Lease(expires=ts, **lease)).SerializeToString()
            ),
        )
    event = {
        "cursor": "1234567:89",
        "instance": "vmp-bench-0001",
        "pool": "bench",
        "service_tag": "bench",
        "owner_principal": "spiffe://cluster.local/ns/ci/sa/runner",
        "reservation_id": "7d1e0c52-4d6b-4b38-9a59-7a3f1c4a2f10",
        "principal": "spiffe://cluster.local/ns/ci/sa/runner",
        "reason": "",
    }
    print(
        "LeaseEvent build+encode (WatchLeases, once per event), µs: betterproto",
        micros(
            lambda: bytes(
                adm.LeaseEvent(
                    time=EXPIRES, type=adm.LeaseEventType.LEASED, expires=EXPIRES, **event
                )
            )
        ),
        "fastwire",
        micros(
            lambda: fastwire.encode_lease_event(
                fastwire.LeaseEventFields(
                    time=instant,
                    type=int(adm.LeaseEventType.LEASED),
                    expires=instant,
                    **event,
                )
            )
        ),
    )
    codec = SafeProtoCodec()
    print(
        "PingResponse encode, µs: betterproto",
        micros(lambda: codec.encode(api.PingResponse(msg="pong"), api.PingResponse)),
        "precomputed",
        micros(lambda: codec.encode(PONG, api.PingResponse)),
    )
    fd = os.open(os.devnull, os.O_WRONLY)
    structlog.contextvars.bind_contextvars(
        principal="anonymous", service_tag="bench", pool="bench", instance="vmp-bench-0001"
    )
    line = {}
    for name, chain in (("structlog's chain", STRUCTLOG_CHAIN), ("logs.JsonLine", None)):
        logs.setup("info", json=True, fd=fd)
        if chain is not None:
            structlog.configure(processors=chain)
        log = structlog.get_logger("vmpool.rpc")
        line[name] = micros(
            lambda log=log: log.info(
                "rpc", method="Lease", code="OK", duration_ms=1.234, peer="127.0.0.1:5555"
            )
        )
    print("one JSON log line (the rpc line), µs:", *(f"{k} {v}" for k, v in line.items()))
    token = service_account_token()
    header = [("authorization", f"Bearer {token}")]
    print(
        f"bearer token read and checked ({len(token)} bytes), µs:",
        micros(lambda: bearer_token(header)),
    )
    metrics = Metrics()
    print(
        "rpc counter child, µs: labels()",
        micros(lambda: metrics.rpc_requests.labels("Lease", "OK")),
        "Children",
        micros(lambda: metrics.rpc_requests_by("Lease", "OK")),
    )


# What logs.setup configured before logs.JsonLine (the same line, five processors).
STRUCTLOG_CHAIN: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.format_exc_info,
    structlog.processors.JSONRenderer(),
]


if __name__ == "__main__":
    main()
