"""The ad-hoc lease (`vmpool lease --runtime R / --intrinsic-os O`, like inctl):
a throw-away pool is created, leased from and deleted again."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmpool.cli.connection import Connection
from vmpool.cli.errors import usage
from vmpool.cli.lease_view import describe
from vmpool.cli.output import progress
from vmpool.cli.pool_client import DEFAULT_HW_TEMPLATE, DEFAULT_TIER, call, stub
from vmpool.core.durations import parse_duration
from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api

AD_HOC_RETRY = 1.0  # seconds between ad-hoc Lease attempts while the pool is not known yet
AD_HOC_SERVER_WAIT = 20  # seconds of server-side wait per Lease once queued
AD_HOC_TIMEOUT = timedelta(minutes=20)  # inctl vm lease --timeout
CLEANUP_TIMEOUT = 30.0

_XID = "0123456789abcdefghijklmnopqrstuv"


def ad_hoc_pool_name(user: str | None, token: str | None = None) -> str:
    """``adhoc-lease-<user>-<id>`` as inctl builds it: in the user name every rune
    that is not a letter, digit or '-' becomes '-', runs collapse, ends trimmed;
    case and non-ASCII letters kept. Cut so the name stays within 128 characters."""
    xid = token or "".join(secrets.choice(_XID) for _ in range(20))
    if user is None:
        return f"adhoc-lease-{xid}"
    cleaned = re.sub(r"-+", "-", "".join(c if c.isalnum() or c == "-" else "-" for c in user))
    cleaned = cleaned.strip("-")[: 128 - len("adhoc-lease--") - len(xid)].strip("-")
    return f"adhoc-lease-{cleaned}-{xid}"


def _current_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


async def _lease_from(
    conn: Connection, args: argparse.Namespace, pool: str, deadline: float
) -> api.Lease:
    """Lease with one reservation id; NOT_FOUND (pool not known yet) and
    RESOURCE_EXHAUSTED (booting, queued) are retried, the queued ones waiting
    server-side."""
    rid = str(uuid.uuid4())
    duration = parse_duration(args.duration) if args.duration else None
    booting = True
    while True:
        request = api.LeaseRequest(pool=pool, service_tag=args.service_tag, reservation_id=rid)
        if duration is not None:
            request.expires = datetime.now(UTC) + duration
        left = deadline - time.monotonic()
        server_wait = max(0, min(AD_HOC_SERVER_WAIT, int(left) - 1)) if not booting else 0
        metadata = conn.call_metadata({"x-vmpool-wait": f"{server_wait}s"} if server_wait else None)
        try:
            reply = await conn.lease.lease(
                request, timeout=conn.timeout + server_wait, metadata=metadata
            )
            return reply.lease
        except GRPCError as err:
            if err.status not in (Status.NOT_FOUND, Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE):
                raise
            if time.monotonic() >= deadline:
                raise
            if err.status is Status.NOT_FOUND and booting:
                progress(".", end="")
            else:
                if booting:
                    progress("")
                booting = False
                if args.output == "text":
                    progress(f"lease request did not succeed yet, retrying soon: {err.message}")
            if booting or err.status is not Status.RESOURCE_EXHAUSTED:
                await asyncio.sleep(AD_HOC_RETRY)


async def ad_hoc_lease(args: argparse.Namespace, conn: Connection) -> dict[str, Any]:
    """Create a throw-away pool, lease from it, delete it (also when interrupted);
    the lease as `vmpool lease` prints it."""
    if args.pool:
        raise usage("--pool: not with --runtime / --intrinsic-os (they make their own pool)")
    name = ad_hoc_pool_name(_current_user())
    spec = papi.Spec(
        runtime=args.runtime or "",
        intrinsic_os=args.intrinsic_os or "",
        pool_tier=DEFAULT_TIER,
        hardware_template=DEFAULT_HW_TEMPLATE,
    )
    pool = await call(conn, stub(conn).create_pool, papi.CreatePoolRequest(name, spec))
    progress(
        f"Created pool {pool.name} with runtime {pool.spec.runtime} and IntrinsicOS "
        f"{pool.spec.intrinsic_os}; once the lease succeeds, this pool will be deleted "
        f"(by hand: vmpool pool delete --pool {pool.name})"
    )
    wait = parse_duration(args.wait).total_seconds() if args.wait else AD_HOC_TIMEOUT.seconds
    try:
        got = await _lease_from(conn, args, pool.name, time.monotonic() + wait)
    finally:
        await _cleanup(conn, pool.name)
    return await describe(conn, got)  # how to reach it, as `vmpool lease` prints


async def _cleanup(conn: Connection, name: str) -> None:
    """DeletePool, even after Ctrl-C: the leased VM (if any) keeps its lease."""
    task = asyncio.ensure_future(
        stub(conn).delete_pool(
            papi.DeletePoolRequest(name=name),
            timeout=CLEANUP_TIMEOUT,
            metadata=conn.call_metadata(),
        )
    )
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait_for(task, CLEANUP_TIMEOUT)  # a second Ctrl-C: still clean up
        raise
    except (GRPCError, OSError, TimeoutError) as err:
        progress(
            f"could not delete temporary pool {name}: {err}; run: vmpool pool delete --pool {name}"
        )
        return
    progress(f"Cleaned up temporary pool {name}")


def add_ad_hoc_flags(lease_parser: argparse.ArgumentParser) -> None:
    """`vmpool lease --runtime R / --intrinsic-os O`: the ad-hoc flow."""
    lease_parser.add_argument(
        "--runtime",
        metavar="VERSION",
        help="lease from a throw-away pool pinned to this runtime (created, leased "
        "from and deleted again; not with --pool; default: none)",
    )
    lease_parser.add_argument(
        "--intrinsic-os",
        metavar="VERSION",
        help="the same, pinned to this IntrinsicOS version (default: none)",
    )
