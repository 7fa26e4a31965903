"""How a lease is shown: as a dict (the keys of `--output json`), with its
connection details (DescribeInstance), or as a line of text."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from betterproto import Casing
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmpool.cli.connection import Connection
from vmpool.core.durations import format_duration
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.proto.vmpool.admin import v1 as adm


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def snake(message: Any) -> dict[str, Any]:
    """A message as a dict with the proto's snake_case names and every field."""
    out: dict[str, Any] = message.to_pydict(casing=Casing.SNAKE, include_default_values=True)
    return {k: rfc3339(v) if isinstance(v, datetime) else v for k, v in out.items()}


def lease_dict(lease: api.Lease) -> dict[str, Any]:
    return {
        "instance": lease.instance,
        "pool": lease.pool,
        "expires": rfc3339(lease.expires),
        "zone": lease.zone,
    }


def details_dict(details: adm.InstanceDetails) -> dict[str, Any]:
    """DescribeInstance's answer, as the keys `vmpool get --output json` adds."""
    return {
        "addresses": list(details.addresses),
        "node": details.node,
        "phase": details.phase,
        "leased_at": rfc3339(details.leased_at),
        "owner": details.owner,
        "reservation_id": details.reservation_id,
    }


async def describe(conn: Connection, lease: api.Lease) -> dict[str, Any]:
    """The lease with its connection details; just the lease from a server that
    has no DescribeInstance (or has ended the lease meanwhile)."""
    out = lease_dict(lease)
    try:
        reply = await conn.extension.describe_instance(
            adm.DescribeInstanceRequest(instance=lease.instance),
            timeout=conn.timeout,
            metadata=conn.call_metadata(),
        )
    except GRPCError as err:
        if err.status in (Status.UNIMPLEMENTED, Status.NOT_FOUND):
            return out
        raise
    return out | details_dict(reply.instance)


def print_lease(args: argparse.Namespace, d: dict[str, Any]) -> None:
    if args.output == "json":
        print(json.dumps(d))
        return
    if getattr(args, "quiet", False):
        print(d["instance"])
        return
    expires = datetime.fromisoformat(d["expires"].replace("Z", "+00:00"))
    left = timedelta(seconds=round((expires - datetime.now(UTC)).total_seconds()))
    print(
        f"{d['instance']}  pool={d['pool']}  zone={d['zone'] or '-'}  "
        f"expires={d['expires']} (in {format_duration(left)})"
    )
    if "addresses" in d:
        print(
            f"  address={','.join(d['addresses']) or '-'}  node={d['node'] or '-'}  "
            f"phase={d['phase'] or '-'}  leased_at={d['leased_at']}  owner={d['owner'] or '-'}"
        )
