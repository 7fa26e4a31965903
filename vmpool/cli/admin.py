"""Operator commands over the admin API: `vmpool status` and `vmpool admin ...`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from grpclib.exceptions import GRPCError, StreamTerminatedError

from vmpool.cli.base import Registry
from vmpool.cli.connection import Connection
from vmpool.cli.errors import usage
from vmpool.cli.lease import duration_flag
from vmpool.cli.lease_view import snake
from vmpool.proto.vmpool.admin import v1 as adm

# Column heads use the words of the JSON keys and the metrics' state labels.
STATUS_COLUMNS = [
    ("POOL", "name"),
    ("READY", "ready"),
    ("PROVISIONING", "provisioning"),
    ("RESERVED", "reserved"),
    ("LEASED", "leased"),
    ("DESTROYING", "destroying"),
    ("QUEUED", "queued"),
    ("OLDEST-QUEUED", "oldest_queued_seconds"),
    ("MIN-READY", "min_ready"),
    ("MAX-SIZE", "max_size"),
]


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def status_table(pools: Sequence[adm.PoolStats]) -> str:
    rows: list[list[str]] = [[head for head, _ in STATUS_COLUMNS]]
    for p in pools:
        note = "" if p.configured else " (removed)"
        note += " (not running)" if p.drained else ""
        row = [p.name + note]
        for _, key in STATUS_COLUMNS[1:]:
            value = getattr(p, key)
            row.append(f"{value:.0f}s" if isinstance(value, float) else str(value))
        rows.append(row)
    return table(rows) + autoscale_table(pools)


def _autoscaled(pool: adm.PoolStats) -> bool:
    """The server sent an autoscale block (it always names a mode or a reason;
    reading the field of a message without one makes an empty one)."""
    return pool.is_set("autoscale") and bool(pool.autoscale.mode or pool.autoscale.reason)


def pool_json(pool: adm.PoolStats) -> dict[str, Any]:
    """A pool's stats for --output json; ``autoscale`` only with the block."""
    scaled = _autoscaled(pool)  # before snake(), which fills in defaults
    out = snake(pool)
    out.pop("autoscale", None)
    if scaled:
        out["autoscale"] = snake(pool.autoscale)
    return out


def autoscale_table(pools: Sequence[adm.PoolStats]) -> str:
    """Below the pools, for pools with an autoscale block: the desired buffer S
    (ready + booting) and what it came from; empty when no pool has one."""
    scaled = [p for p in pools if _autoscaled(p)]
    if not scaled:
        return ""
    rows = [
        [
            "AUTOSCALE",
            "MODE",
            "DESIRED",
            "REASON",
            "ARRIVALS/MIN",
            "BOOT-MEAN",
            "BOOT-P95",
            "RATE-TERM",
            "PROFILE-TERM",
        ]
    ]
    for p in scaled:
        a = p.autoscale
        rows.append(
            [
                p.name,
                a.mode or "-",
                str(a.desired_ready),
                a.reason,
                f"{a.arrivals_per_minute:.2f}",
                f"{a.boot_mean_seconds:.1f}s",
                f"{a.boot_p95_seconds:.1f}s",
                str(a.rate_term),
                str(a.profile_term),
            ]
        )
    return "\n\n" + table(rows)


async def _status_text(args: argparse.Namespace, conn: Connection) -> str:
    reply = await conn.admin.pool_stats(
        adm.PoolStatsRequest(), timeout=conn.timeout, metadata=conn.call_metadata()
    )
    if args.output == "json":
        return json.dumps([pool_json(p) for p in reply.pools])
    return status_table(reply.pools)


async def status(args: argparse.Namespace, conn: Connection) -> None:
    if args.watch is None:
        print(await _status_text(args, conn))
        return
    await watch(args, conn)


async def watch(args: argparse.Namespace, conn: Connection) -> None:
    """Redraw the status every --watch interval until Ctrl-C (exit 0). On a
    terminal the screen is redrawn; piped, the table is printed again only when
    it changed (JSON: one line per change). Errors are shown and retried: a
    watch survives a server restart."""
    interval = duration_flag("--watch", args.watch).total_seconds()
    if interval < 0.5:
        raise usage("--watch: at least 0.5s between refreshes")
    tty = sys.stdout.isatty() and args.output == "text"
    last = None
    try:
        while True:
            try:
                text = await _status_text(args, conn)
            except (GRPCError, OSError, StreamTerminatedError, TimeoutError) as err:
                why = f"{err.status.name}: {err.message}" if isinstance(err, GRPCError) else err
                text = f"vmpool: cannot read the status ({why or type(err).__name__}); retrying"
            if tty:
                stamp = datetime.now().strftime("%H:%M:%S")
                sys.stdout.write(f"\x1b[H\x1b[2J{stamp}  every {args.watch}  (Ctrl-C stops)\n")
                print(text, flush=True)
            elif text != last:
                print(text, flush=True)
                if args.output == "text":
                    print(flush=True)
            last = text
            await asyncio.sleep(interval)
    except asyncio.CancelledError:
        return  # Ctrl-C: the way to stop watching


def records(items: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not items:
        return "(none)"
    rows = [[c.upper().replace("_", "-") for c in columns]]
    rows += [[str(item.get(c, "")) or "-" for c in columns] for item in items]
    return table(rows)


async def admin(args: argparse.Namespace, conn: Connection) -> None:
    stub, t, md = conn.admin, conn.timeout, conn.call_metadata()
    text: str
    out: Any
    if args.action == "leases":
        reply = await stub.list_leases(
            adm.ListLeasesRequest(pool=args.target), timeout=t, metadata=md
        )
        out = [snake(x) for x in reply.leases]
        text = records(out, ["instance", "pool", "service_tag", "leased_at", "expires", "zone"])
    else:
        res = await stub.list_reservations(
            adm.ListReservationsRequest(pool=args.target), timeout=t, metadata=md
        )
        out = [snake(x) for x in res.reservations]
        text = records(
            out, ["id", "pool", "service_tag", "position", "enqueued_at", "expires", "instance"]
        )
    print(json.dumps(out, default=str) if args.output == "json" else text)


def register(reg: Registry) -> None:
    p = reg.client(
        "status",
        status,
        help="pools as a table: VMs per state, queue, sizing (admin API)",
        examples=["vmpool status", "vmpool status --watch 2s", "vmpool status --output json"],
    )
    p.add_argument(
        "--watch",
        metavar="INTERVAL",
        nargs="?",
        const="2s",
        help="refresh every INTERVAL until Ctrl-C (default: no watching; --watch alone: 2s)",
    )
    p = reg.client(
        "admin",
        admin,
        help="operator commands (admin API)",
        examples=[
            "vmpool admin leases small",
            "vmpool admin reservations",
            "vmpool pool pause --pool small    # pool changes and StopLease: vmpool pool",
        ],
    )
    p.add_argument("action", choices=["leases", "reservations"], help="what to list")
    p.add_argument("target", nargs="?", default="", help="a pool (default: every pool)")
