"""`vmpool reservation list|cancel`: one's own queued reservations (the
extension API), e.g. one that `vmpool lease --wait --keep-reservation` left."""

from __future__ import annotations

import argparse
import json

from vmpool.cli.admin import records
from vmpool.cli.base import Registry
from vmpool.cli.connection import Connection
from vmpool.cli.errors import usage
from vmpool.cli.lease_view import snake
from vmpool.cli.wait import cancel_reservation
from vmpool.proto.vmpool.admin import v1 as adm

COLUMNS = ["id", "pool", "position", "enqueued_at", "expires", "instance"]


async def reservation(args: argparse.Namespace, conn: Connection) -> None:
    if args.action == "list":
        if args.id:
            raise usage("reservation list: takes no ID (--pool narrows it to one pool)")
        reply = await conn.extension.list_my_reservations(
            adm.ListMyReservationsRequest(service_tag=args.service_tag, pool=args.pool),
            timeout=conn.timeout,
            metadata=conn.call_metadata(),
        )
        out = [snake(r) for r in reply.reservations]
        print(json.dumps(out, default=str) if args.output == "json" else records(out, COLUMNS))
        return
    if not args.id:
        raise usage("reservation cancel: give the reservation's ID (vmpool reservation list)")
    outcome = await cancel_reservation(conn, args.id, args.service_tag)
    if args.output == "json":
        print(json.dumps({"cancelled": args.id, "outcome": outcome}))
    else:
        print(outcome)


def register(reg: Registry) -> None:
    p = reg.client(
        "reservation",
        reservation,
        help="list or cancel your own queued reservations",
        description="List your queued reservations (this --service-tag and your "
        "identity) with their place in the queue, or cancel one: its place, and any "
        "VM set aside for it, go to the next in line at once; a lease already granted "
        "for it that you never received is ended.",
        examples=[
            "vmpool reservation list",
            "vmpool reservation list --pool small --output json",
            "vmpool reservation cancel 5f0c6a9e-2b1d-4c55-9a43-8f5c2d1e7b10",
        ],
    )
    p.add_argument("action", choices=["list", "cancel"], help="what to do")
    p.add_argument("id", nargs="?", default="", metavar="ID", help="the reservation (cancel)")
    p.add_argument("--pool", default="", help="list only this pool (default: every pool)")
