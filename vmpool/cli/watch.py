"""`vmpool watch`: lease events as they happen (WatchLeases), one line each."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from vmpool.cli import errors as cli_errors
from vmpool.cli.base import Registry
from vmpool.cli.connection import Connection
from vmpool.cli.lease import duration_flag
from vmpool.cli.lease_view import snake
from vmpool.core.backoff import backoff_ceiling
from vmpool.proto.vmpool.admin import v1 as adm

QUIET = {"HEARTBEAT"}
_NAMES = {t.value: t.name for t in adm.LeaseEventType}


def ago(at: datetime, now: datetime) -> str:
    """A relative time for people: "now", "3s ago", "in 4m10s"."""
    seconds = round((at - now).total_seconds())
    if seconds == 0:
        return "now"
    span = abs(seconds)
    text = (
        f"{span}s"
        if span < 60
        else f"{span // 60}m{span % 60:02d}s"
        if span < 3600
        else f"{span // 3600}h{span % 3600 // 60:02d}m"
    )
    return f"in {text}" if seconds > 0 else f"{text} ago"


def line(event: adm.LeaseEvent, now: datetime) -> str:
    """One aligned line: when, what, which instance, pool, owner, then details."""
    kind = _NAMES.get(event.type, str(event.type))
    owner = event.service_tag or '""'
    if event.owner_principal and event.owner_principal != "anonymous":
        owner = f"{event.owner_principal}/{owner}"
    details = []
    if event.expires.timestamp() > 0 and kind not in ("RETURNED", "STOPPED", "RELEASED"):
        details.append(f"expires {ago(event.expires, now)}")
    if event.reservation_id:
        details.append(f"reservation {event.reservation_id[:8]}")
    if event.principal and event.principal != event.owner_principal:
        details.append(f"by {event.principal}")
    if event.reason and kind not in ("RETURNED", "EXPIRED"):
        details.append(f"({event.reason})")
    cols = [
        ago(event.time, now).rjust(9),
        kind.ljust(21),
        (event.instance or "-").ljust(26),
        event.pool.ljust(12),
        owner.ljust(16),
        "  ".join(details),
    ]
    return "  ".join(cols).rstrip()


def as_json(event: adm.LeaseEvent) -> str:
    out = snake(event)
    out["type"] = _NAMES.get(event.type, str(event.type))
    if event.expires.timestamp() <= 0:
        out["expires"] = None
    return json.dumps(out, separators=(",", ":"))


def _resumable(err: BaseException) -> bool:
    if isinstance(err, GRPCError):
        slow = err.status is Status.RESOURCE_EXHAUSTED and "fell" in (err.message or "")
        return err.status is Status.UNAVAILABLE or slow
    return isinstance(err, OSError | StreamTerminatedError | TimeoutError)


async def _events(conn: Connection, request: adm.WatchLeasesRequest) -> AsyncIterator[Any]:
    async for event in conn.extension.watch_leases(request, metadata=conn.call_metadata()):
        yield event


async def watch(args: argparse.Namespace, conn: Connection) -> None:
    """Print events until Ctrl-C (exit 130, quietly). A stream the server ends
    with UNAVAILABLE (shutdown, restart) or for a slow reader is resumed from the
    last cursor, with backoff; other errors end the command."""
    lead = (
        -1
        if args.expiring_lead == "off"
        else int(duration_flag("--expiring-lead", args.expiring_lead).total_seconds())
    )
    request = adm.WatchLeasesRequest(
        after=args.after,
        snapshot=args.snapshot,
        pool=args.pool,
        instance=args.instance,
        expiring_lead_seconds=lead or -1,
    )
    if args.mine:
        request.service_tag = args.service_tag
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
    task = asyncio.ensure_future(_follow(args, conn, request))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise SystemExit(cli_errors.INTERRUPTED)
    task.result()


async def _follow(
    args: argparse.Namespace, conn: Connection, request: adm.WatchLeasesRequest
) -> None:
    # Printed out here, not in _lines: a closed stdout (`| head`) is no stream
    # failure to resume from; its BrokenPipeError ends the command (exit 141).
    async for text in _lines(args, conn, request):
        print(text, flush=True)


async def _lines(
    args: argparse.Namespace, conn: Connection, request: adm.WatchLeasesRequest
) -> AsyncIterator[str]:
    failures = 0
    while True:
        try:
            async for event in _events(conn, request):
                failures = 0
                if event.cursor:
                    request.after = event.cursor
                    request.snapshot = False  # a resumed stream goes on from the cursor
                if _NAMES.get(event.type) in QUIET:
                    continue
                yield as_json(event) if args.output == "json" else line(event, datetime.now(UTC))
            return  # the server ended the stream normally
        except (GRPCError, OSError, StreamTerminatedError, TimeoutError) as err:
            if not _resumable(err):
                raise
            failures += 1
            why = f"{err.status.name}: {err.message}" if isinstance(err, GRPCError) else err
            delay = backoff_ceiling(failures, 0.5, 10.0)
            print(f"vmpool: stream ended ({why or type(err).__name__}); resuming", file=sys.stderr)
            await asyncio.sleep(delay)


def register(reg: Registry) -> None:
    p = reg.client(
        "watch",
        watch,
        help="lease events as they happen: leased, extended, expiring, returned, ...",
        examples=[
            "vmpool watch",
            "vmpool watch --pool small --output json",
            "vmpool watch --snapshot --mine",
            "vmpool watch --after CURSOR    # resume after an event's cursor",
        ],
    )
    p.add_argument("--pool", default="", help="only this pool (default: every pool)")
    p.add_argument("--instance", default="", help="only this instance (default: every instance)")
    p.add_argument(
        "--after", default="", metavar="CURSOR", help="resume after this cursor (default: from now)"
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="first the current leases and queued reservations (default: off)",
    )
    p.add_argument(
        "--mine",
        action="store_true",
        help="only leases of --service-tag (default: off, every lease the caller may see)",
    )
    p.add_argument(
        "--expiring-lead",
        default="5m",
        metavar="DURATION",
        help="EXPIRING this long before a lease expires, or 'off' (default: 5m)",
    )
