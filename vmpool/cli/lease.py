"""The lease commands (`vmpool ping|pools|lease|get|extend|return`), like `inctl vm`."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from datetime import UTC, datetime, timedelta

from betterproto.lib.google.protobuf import Empty

from vmpool.cli.ad_hoc import ad_hoc_lease, add_ad_hoc_flags
from vmpool.cli.base import Registry
from vmpool.cli.connection import Connection
from vmpool.cli.errors import usage
from vmpool.cli.lease_view import describe, lease_dict, print_lease, rfc3339
from vmpool.cli.wait import lease_with_wait
from vmpool.core.durations import parse_duration
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api


def duration_flag(flag: str, text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise usage(f"{flag}: {err}") from None


async def ping(args: argparse.Namespace, conn: Connection) -> None:
    reply = await conn.lease.ping(Empty(), timeout=conn.timeout, metadata=conn.call_metadata())
    print(json.dumps({"msg": reply.msg}) if args.output == "json" else reply.msg)


async def pools(args: argparse.Namespace, conn: Connection) -> None:
    reply = await conn.lease.pools(
        api.PoolsRequest(), timeout=conn.timeout, metadata=conn.call_metadata()
    )
    if args.output == "json":
        out = [
            {"name": p.name, "labels": {lb.key: lb.value for lb in p.labels}} for p in reply.pools
        ]
        print(json.dumps(out))
        return
    for p in reply.pools:
        labels = ",".join(f"{lb.key}={lb.value}" for lb in p.labels)
        print(f"{p.name}\t{labels}")


async def lease(args: argparse.Namespace, conn: Connection) -> None:
    if args.runtime or args.intrinsic_os:  # the ad-hoc flow: a throw-away pool
        print_lease(args, await ad_hoc_lease(args, conn))
        return

    wait = duration_flag("--wait", args.wait) if args.wait else timedelta(0)
    duration = duration_flag("--duration", args.duration) if args.duration else None
    rid = args.reservation_id or (str(uuid.uuid4()) if wait else None)
    if rid is not None:
        try:
            uuid.UUID(rid)
        except ValueError:
            raise usage(f"--reservation-id: {rid!r} is not a UUID") from None
    got = await lease_with_wait(
        conn,
        pool=args.pool,
        service_tag=args.service_tag,
        duration=duration,
        reservation_id=rid,
        wait=wait,
        progress=sys.stderr,
        progress_json=args.output == "json",
        keep_reservation=args.keep_reservation,
    )
    # -q prints the name only: no need for the details.
    print_lease(args, lease_dict(got) if args.quiet else await describe(conn, got))


async def get(args: argparse.Namespace, conn: Connection) -> None:
    reply = await conn.lease.get_lease(
        api.GetLeaseRequest(instance=args.instance),
        timeout=conn.timeout,
        metadata=conn.call_metadata(),
    )
    print_lease(args, await describe(conn, reply.lease))


async def extend(args: argparse.Namespace, conn: Connection) -> None:
    to = datetime.now(UTC) + duration_flag("DURATION", args.duration)
    reply = await conn.lease.extend_to(
        api.ExtendToRequest(
            instance=args.instance,
            to=to,
            service_tag=args.service_tag,
            extend_only=args.extend_only,
        ),
        timeout=conn.timeout,
        metadata=conn.call_metadata(),
    )
    if abs((reply.lease.expires - to).total_seconds()) > 1 and args.output == "text":
        print(
            f"note: expiry is {rfc3339(reply.lease.expires)}, not the {rfc3339(to)} "
            "asked for (capped by the pool, or --extend-only)",
            file=sys.stderr,
        )
    print_lease(args, lease_dict(reply.lease))


async def return_(args: argparse.Namespace, conn: Connection) -> None:
    await conn.lease.return_(
        api.ReturnRequest(instance=args.instance, service_tag=args.service_tag),
        timeout=conn.timeout,
        metadata=conn.call_metadata(),
    )
    if args.output == "json":
        print(json.dumps({"returned": args.instance}))
    else:
        print(f"returned {args.instance}; its VM is being destroyed")


def register(reg: Registry) -> None:
    reg.client(
        "ping",
        ping,
        help="check the server and its database",
        examples=["vmpool ping", "vmpool --server vmpool.example:50051 ping"],
    )
    reg.client(
        "pools",
        pools,
        help="list the pools and their labels",
        examples=["vmpool pools", "vmpool pools --output json"],
    )
    p = reg.client(
        "lease",
        lease,
        help="lease a VM",
        description="Lease a free VM. With --wait, join the pool's queue with one "
        "reservation id and keep trying until a VM is yours or the wait runs out.",
        examples=[
            "vmpool lease",
            "vmpool lease --pool small --duration 2h",
            "vmpool lease --pool small --wait 20m --output json",
            "vmpool lease --pool small --wait 3s --keep-reservation",
            "INSTANCE=$(vmpool lease -q)",
        ],
    )
    p.add_argument(
        "--pool",
        default="",
        help="pool to lease from (default: the server's default_pool, else the pool "
        "with the most free VMs)",
    )
    p.add_argument(
        "--duration",
        metavar="DURATION",
        help="how long the lease lasts, e.g. 30m or 8h (default: the pool's default_lease)",
    )
    p.add_argument(
        "--reservation-id",
        metavar="UUID",
        help="keeps your place in the queue across runs (default: a new UUID with --wait)",
    )
    p.add_argument(
        "--wait",
        metavar="DURATION",
        help="keep trying this long when no VM is free, e.g. 20m, showing the queue "
        "position (default: no waiting; with --runtime / --intrinsic-os: 20m for the "
        "whole flow)",
    )
    p.add_argument(
        "--keep-reservation",
        action="store_true",
        help="when --wait runs out, leave the reservation queued (until the pool's "
        "reservation_ttl) and print how to resume or cancel it (default: cancel it, so "
        "no VM is set aside for nobody; Ctrl-C always cancels)",
    )
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print only the instance name (for INSTANCE=$(vmpool lease -q))",
    )
    add_ad_hoc_flags(p)  # --runtime, --intrinsic-os

    p = reg.client(
        "get",
        get,
        help="show an instance's lease and how to reach it (addresses, node, phase)",
        examples=["vmpool get vmp-3f30-x9t7q72u", "vmpool get $INSTANCE --output json"],
    )
    p.add_argument("instance", metavar="INSTANCE", help="the instance name (vmp-...)")

    p = reg.client(
        "extend",
        extend,
        help="move a lease's expiry to now + DURATION",
        examples=["vmpool extend $INSTANCE 2h", "vmpool extend $INSTANCE 1h --extend-only"],
    )
    p.add_argument("instance", metavar="INSTANCE", help="the instance name (vmp-...)")
    p.add_argument("duration", metavar="DURATION", help="from now, e.g. 1h")
    p.add_argument(
        "--extend-only", action="store_true", help="never shorten the lease (default: off)"
    )

    p = reg.client(
        "return",
        return_,
        help="return a VM (it is destroyed)",
        examples=["vmpool return $INSTANCE"],
    )
    p.add_argument("instance", metavar="INSTANCE", help="the instance name (vmp-...)")
