"""Client commands of the `vmpool` CLI, over the generated grpclib stubs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from betterproto import Casing
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmpool.durations import format_duration, parse_duration
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.proto.vmpool.admin import v1 as adm

WAIT_STEP = 20.0  # seconds of server-side wait per Lease call while --wait runs


@asynccontextmanager
async def _channel(args: argparse.Namespace) -> AsyncIterator[Channel]:
    host, sep, port = args.server.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--server: {args.server!r} is not HOST:PORT")
    channel = Channel(host.strip("[]") or "localhost", int(port))
    try:
        yield channel
    finally:
        channel.close()


def _timeout(args: argparse.Namespace) -> float:
    try:
        return parse_duration(args.timeout).total_seconds()
    except ValueError as err:
        raise ValueError(f"--timeout: {err}") from None


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _lease_dict(lease: api.Lease) -> dict[str, str]:
    return {
        "instance": lease.instance,
        "pool": lease.pool,
        "expires": rfc3339(lease.expires),
        "zone": lease.zone,
    }


def _print_lease(args: argparse.Namespace, lease: api.Lease) -> None:
    d = _lease_dict(lease)
    if args.output == "json":
        print(json.dumps(d))
        return
    left = timedelta(seconds=round((lease.expires - datetime.now(UTC)).total_seconds()))
    print(
        f"{d['instance']}  pool={d['pool']}  zone={d['zone'] or '-'}  "
        f"expires={d['expires']} (in {format_duration(left)})"
    )


def _snake(message: Any) -> dict[str, Any]:
    """A message as a dict with the proto's snake_case names and every field."""
    out: dict[str, Any] = message.to_pydict(casing=Casing.SNAKE, include_default_values=True)
    return {k: rfc3339(v) if isinstance(v, datetime) else v for k, v in out.items()}


async def ping(args: argparse.Namespace) -> None:
    async with _channel(args) as ch:
        reply = await api.VmPoolLeaseServiceStub(ch).ping(Empty(), timeout=_timeout(args))
    print(json.dumps({"msg": reply.msg}) if args.output == "json" else reply.msg)


async def pools(args: argparse.Namespace) -> None:
    async with _channel(args) as ch:
        reply = await api.VmPoolLeaseServiceStub(ch).pools(
            api.PoolsRequest(), timeout=_timeout(args)
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


async def lease(args: argparse.Namespace) -> None:
    expires = None
    if args.duration:
        expires = datetime.now(UTC) + parse_duration(args.duration)
    wait = parse_duration(args.wait).total_seconds() if args.wait else 0.0
    rid = args.reservation_id or (str(uuid.uuid4()) if wait else None)
    deadline = time.monotonic() + wait
    async with _channel(args) as ch:
        stub = api.VmPoolLeaseServiceStub(ch)
        calls = 0
        while True:
            # The first call answers at once, so the queue position shows right away;
            # the later ones wait server-side for an instance.
            step = max(0.0, min(WAIT_STEP, deadline - time.monotonic())) if calls else 0.0
            calls += 1
            metadata = {"x-vmpool-wait": f"{step:.0f}s"} if step >= 1 else None
            request = api.LeaseRequest(
                pool=args.pool, service_tag=args.service_tag, reservation_id=rid
            )
            if expires is not None:
                request.expires = expires
            try:
                reply = await stub.lease(request, timeout=_timeout(args) + step, metadata=metadata)
            except GRPCError as err:
                retry = err.status in (
                    Status.RESOURCE_EXHAUSTED,
                    Status.UNAVAILABLE,
                    Status.NOT_FOUND,
                )
                if not wait or not retry or time.monotonic() >= deadline:
                    raise
                print(f"waiting: {err.message}", file=sys.stderr, flush=True)
                if step < 1 and calls > 1:
                    await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            _print_lease(args, reply.lease)
            return


async def get(args: argparse.Namespace) -> None:
    async with _channel(args) as ch:
        reply = await api.VmPoolLeaseServiceStub(ch).get_lease(
            api.GetLeaseRequest(instance=args.instance), timeout=_timeout(args)
        )
    _print_lease(args, reply.lease)


async def extend(args: argparse.Namespace) -> None:
    to = datetime.now(UTC) + parse_duration(args.duration)
    async with _channel(args) as ch:
        reply = await api.VmPoolLeaseServiceStub(ch).extend_to(
            api.ExtendToRequest(
                instance=args.instance,
                to=to,
                service_tag=args.service_tag,
                extend_only=args.extend_only,
            ),
            timeout=_timeout(args),
        )
    if abs((reply.lease.expires - to).total_seconds()) > 1 and args.output == "text":
        print(
            f"note: expiry is {rfc3339(reply.lease.expires)}, not the {rfc3339(to)} "
            "asked for (capped by the pool, or --extend-only)",
            file=sys.stderr,
        )
    _print_lease(args, reply.lease)


async def return_(args: argparse.Namespace) -> None:
    async with _channel(args) as ch:
        await api.VmPoolLeaseServiceStub(ch).return_(
            api.ReturnRequest(instance=args.instance, service_tag=args.service_tag),
            timeout=_timeout(args),
        )
    if args.output == "json":
        print(json.dumps({"returned": args.instance}))
    else:
        print(f"returned {args.instance}; its VM is being destroyed")


async def status(args: argparse.Namespace) -> None:
    async with _channel(args) as ch:
        reply = await adm.VmPoolAdminServiceStub(ch).pool_stats(
            adm.PoolStatsRequest(), timeout=_timeout(args)
        )
    rows = [_snake(p) for p in reply.pools]
    if args.output == "json":
        print(json.dumps(rows))
        return
    cols = [
        "name",
        "ready",
        "provisioning",
        "reserved",
        "leased",
        "destroying",
        "queued",
        "oldest_queued_seconds",
        "min_ready",
        "max_size",
    ]
    heads = [
        "POOL",
        "READY",
        "BOOTING",
        "SET-ASIDE",
        "LEASED",
        "DESTROYING",
        "QUEUED",
        "OLDEST-WAIT",
        "MIN",
        "MAX",
    ]
    table: list[list[str]] = [heads]
    for p in reply.pools:
        note = "" if p.configured else " (removed)"
        note += " (drained)" if p.drained else ""
        table.append(
            [
                p.name + note,
                str(p.ready),
                str(p.provisioning),
                str(p.reserved),
                str(p.leased),
                str(p.destroying),
                str(p.queued),
                f"{p.oldest_queued_seconds:.0f}s",
                str(p.min_ready),
                str(p.max_size),
            ]
        )
    assert len(cols) == len(heads)
    widths = [max(len(r[i]) for r in table) for i in range(len(heads))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


async def admin(args: argparse.Namespace) -> None:
    async with _channel(args) as ch:
        stub = adm.VmPoolAdminServiceStub(ch)
        t = _timeout(args)
        out: Any
        if args.action == "leases":
            reply = await stub.list_leases(adm.ListLeasesRequest(pool=args.target), timeout=t)
            out = [_snake(x) for x in reply.leases]
        elif args.action == "reservations":
            res = await stub.list_reservations(
                adm.ListReservationsRequest(pool=args.target), timeout=t
            )
            out = [_snake(x) for x in res.reservations]
        elif args.action == "force-return":
            await stub.force_return(
                adm.ForceReturnRequest(instance=args.target, reason=args.reason), timeout=t
            )
            out = {"force_returned": args.target}
        elif args.action == "drain":
            await stub.drain_pool(adm.DrainPoolRequest(pool=args.target), timeout=t)
            out = {"drained": args.target}
        else:
            await stub.undrain_pool(adm.UndrainPoolRequest(pool=args.target), timeout=t)
            out = {"undrained": args.target}
    if args.output == "json" or isinstance(out, dict):
        print(json.dumps(out, default=str))
        return
    for item in out:
        print("  ".join(f"{k}={v}" for k, v in item.items()))
