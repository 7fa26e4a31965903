"""The floor: the least a grpclib + asyncpg server can do per Lease, Return and Ping.

`python -m tests.bench.floor --stubs DIR --database-url URL --port N` serves the
lease API's Ping, Lease and Return with protobuf (upb) messages generated into
DIR (``generate_stubs``) and grpclib's own codec (grpclib.encoding.proto.ProtoCodec,
its default); no auth, logs, metrics, reservations or reconciler:

- Ping: a constant reply.
- Lease: one statement, a CTE that claims a free row (``ORDER BY id LIMIT 1
  FOR UPDATE SKIP LOCKED``) and marks it leased by the caller's service tag.
- Return: one statement that deletes the leased row (owner checked) and inserts
  its replacement as free.

400 free rows, an asyncpg pool of 8, on the event loop vmpool serves on
(``vmpool.core.eventloop``). Bench code, not shipped: the benchmark measures
vmpool's figures as ratios to this server's (tests/bench/versus.py).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from vmpool.core.eventloop import run as run_loop

API = Path(__file__).resolve().parents[2] / "api"
PROTO = "intrinsic_proto/vmpoolleaseapi/v1/vmpoolleaseapi.proto"
MODULE = "intrinsic_proto.vmpoolleaseapi.v1.vmpoolleaseapi_pb2"
SERVICE = "/intrinsic_proto.vmpoolleaseapi.v1.VMPoolLeaseService/"
FREE_ROWS = 400
POOL_SIZE = 8
LEASE_SECONDS = 3600

SCHEMA = """
DROP TABLE IF EXISTS floor_vms;
CREATE TABLE floor_vms (
    id bigserial PRIMARY KEY,
    pool text NOT NULL,
    zone text NOT NULL,
    state text NOT NULL,
    owner text,
    expires timestamptz
);
CREATE INDEX floor_vms_free ON floor_vms (id) WHERE state = 'free';
"""
SEED = """
INSERT INTO floor_vms (pool, zone, state)
    SELECT $1, 'zone-a', 'free' FROM generate_series(1, $2);
"""

LEASE = """
WITH claimed AS (
    SELECT id FROM floor_vms WHERE state = 'free'
    ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
)
UPDATE floor_vms v SET state = 'leased', owner = $1, expires = $2
FROM claimed WHERE v.id = claimed.id
RETURNING v.id, v.pool, v.zone
"""

RETURN = """
WITH gone AS (
    DELETE FROM floor_vms WHERE id = $1 AND state = 'leased' AND owner = $2
    RETURNING pool, zone
)
INSERT INTO floor_vms (pool, zone, state) SELECT pool, zone, 'free' FROM gone
RETURNING id
"""


def generate_stubs(out: Path) -> None:
    """protobuf (upb) message classes for the lease API, generated into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{API}", f"--python_out={out}", PROTO],
        check=True,
        capture_output=True,
        cwd=out,
    )


def load_messages(stubs: Path) -> ModuleType:
    sys.path.insert(0, str(stubs))
    return importlib.import_module(MODULE)


class Floor:
    def __init__(self, pb: ModuleType, db: asyncpg.Pool) -> None:
        from google.protobuf import empty_pb2

        self.pb = pb
        self.db = db
        self.empty = empty_pb2.Empty
        self.pong = pb.PingResponse(msg="pong")

    async def ping(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(self.pong)

    async def lease(self, stream: Stream[Any, Any]) -> None:
        req = await stream.recv_message()
        assert req is not None
        pb = self.pb
        expires = pb.google_dot_protobuf_dot_timestamp__pb2.Timestamp()
        if req.HasField("expires"):
            expires.CopyFrom(req.expires)
        else:
            expires.FromNanoseconds(time.time_ns() + LEASE_SECONDS * 1_000_000_000)
        row = await self.db.fetchrow(LEASE, req.service_tag, expires.ToDatetime(tzinfo=UTC))
        if row is None:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, "no free instance")
        lease = pb.Lease(instance=f"floor-{row[0]}", pool=row[1], zone=row[2], expires=expires)
        await stream.send_message(pb.LeaseResponse(lease=lease))

    async def return_(self, stream: Stream[Any, Any]) -> None:
        req = await stream.recv_message()
        assert req is not None
        _, _, number = req.instance.rpartition("-")
        if not number.isdigit():
            raise GRPCError(Status.INVALID_ARGUMENT, "instance: not a floor instance")
        if await self.db.fetchval(RETURN, int(number), req.service_tag) is None:
            raise GRPCError(Status.NOT_FOUND, "instance: no such lease")
        await stream.send_message(self.pb.ReturnResponse())

    def __mapping__(self) -> dict[str, Handler]:
        pb, unary = self.pb, Cardinality.UNARY_UNARY
        return {
            SERVICE + "Ping": Handler(self.ping, unary, self.empty, pb.PingResponse),
            SERVICE + "Lease": Handler(self.lease, unary, pb.LeaseRequest, pb.LeaseResponse),
            SERVICE + "Return": Handler(self.return_, unary, pb.ReturnRequest, pb.ReturnResponse),
        }


async def serve(args: argparse.Namespace) -> None:
    pb = load_messages(Path(args.stubs))
    setup = await asyncpg.connect(args.database_url)
    try:
        await setup.execute(SCHEMA)
        await setup.execute(SEED, args.pool, FREE_ROWS)
        await setup.execute("VACUUM ANALYZE floor_vms")
    finally:
        await setup.close()
    db = await asyncpg.create_pool(args.database_url, min_size=POOL_SIZE, max_size=POOL_SIZE)
    server = Server([Floor(pb, db)])
    await server.start("127.0.0.1", args.port)
    print("serving", flush=True)
    try:
        await server.wait_closed()
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floor", description=__doc__)
    parser.add_argument("--stubs", required=True, help="directory of generate_stubs()")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool", default="bench", help="the pool name its rows carry")
    run_loop(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
