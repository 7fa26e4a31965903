"""`vmpool pool ...` (like `inctl vm pool ...`).

Flags and output follow pool-api-research.md section 2: Pools print as
multi-line prototext, lists as TAB-separated tables with an idx column,
`--output json` prints JSON with the proto's field names, and `--wait-timeout`
polls until the pool is ready (create, update) or gone (delete).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC
from typing import Any

from betterproto.lib.google.protobuf import FieldMask
from grpclib.exceptions import GRPCError

from vmpool.cli.base import ClientHandler, HelpFormatter, Registry, run_client
from vmpool.cli.connection import Connection, add_connection_flags
from vmpool.cli.errors import NOT_FOUND, CliError, usage
from vmpool.cli.output import (
    go_time,
    pool_dict,
    print_pool,
    print_rows,
    progress,
    prototext,
    tab_table,
)
from vmpool.cli.pool_client import DEFAULT_HW_TEMPLATE, DEFAULT_TIER, call, listed, stub
from vmpool.core.durations import parse_duration
from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi

POLL_EVERY = 2.0  # seconds between --wait-timeout polls (inctl: 10 s)
# (flag attribute, Spec field): the order inctl puts mask paths in.
SPEC_FLAGS = [
    ("runtime", "runtime"),
    ("intrinsic_os", "intrinsic_os"),
    ("tier", "pool_tier"),
    ("hwtemplate", "hardware_template"),
]


# --- waiting ----------------------------------------------------------------------------


def _wait_seconds(args: argparse.Namespace) -> float:
    try:
        return parse_duration(args.wait_timeout).total_seconds() if args.wait_timeout else 0.0
    except ValueError as err:
        raise usage(f"--wait-timeout: {err}") from None


async def _poll(
    what: str, timeout: float, probe: Callable[[], Awaitable[bool]], *, output: str
) -> None:
    """Call ``probe`` every POLL_EVERY s until it says done; errors are retried."""
    if output == "text":
        progress(f"Waiting for VM pool {what}", end="")
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await probe():
                if output == "text":
                    progress("")
                return
            if output == "text":
                progress(".", end="")
        except GRPCError as err:
            if output == "text":
                progress(f"? (error: {err.status.name}: {err.message}, retrying)", end="")
        if time.monotonic() + POLL_EVERY > deadline:
            raise CliError("DEADLINE_EXCEEDED", f"--wait-timeout: VM pool not {what} in time", 6)
        await asyncio.sleep(POLL_EVERY)


# --- commands ---------------------------------------------------------------------------


def _spec(args: argparse.Namespace) -> papi.Spec:
    return papi.Spec(
        runtime=args.runtime or "",
        intrinsic_os=args.intrinsic_os or "",
        pool_tier=args.tier if args.tier is not None else DEFAULT_TIER,
        hardware_template=args.hwtemplate if args.hwtemplate is not None else DEFAULT_HW_TEMPLATE,
    )


async def create(args: argparse.Namespace, conn: Connection) -> None:
    wait = _wait_seconds(args)
    spec = _spec(args)
    spec.pool_tier = spec.pool_tier or DEFAULT_TIER
    spec.hardware_template = spec.hardware_template or DEFAULT_HW_TEMPLATE
    pool = await call(conn, stub(conn).create_pool, papi.CreatePoolRequest(args.pool, spec))
    print_pool(args, pool, "VM pool created.")
    if wait > 0:

        async def ready() -> bool:
            got = await listed(conn, pool.name)
            return (
                got is not None
                and got.current_status == "RUNNING"
                and not got.reconciling
                and got.spec == pool.spec
            )

        await _poll(f"{pool.name!r} to become ready", wait, ready, output=args.output)
        if args.output == "text":
            print(f"VM pool {pool.name!r} is ready.")


async def update(args: argparse.Namespace, conn: Connection) -> None:
    wait = _wait_seconds(args)
    paths = [f"spec.{field}" for flag, field in SPEC_FLAGS if getattr(args, flag) is not None]
    request = papi.UpdatePoolRequest(
        name=args.pool, spec=_spec(args), update_mask=FieldMask(paths=paths)
    )
    # betterproto leaves an empty message field off the wire; inctl sends the
    # mask present but empty when no flag is given ("no fields will be updated").
    data = bytes(request) + (b"" if paths else b"\x1a\x00")
    request = papi.UpdatePoolRequest().parse(data)
    pool = await call(conn, stub(conn).update_pool, request)
    if not pool.name:
        print("VM pool unchanged.")
        return
    print_pool(
        args, pool, "VM Pool update in progress..." if pool.reconciling else "VM pool updated."
    )
    if wait > 0:

        async def ready() -> bool:
            again = await call(conn, stub(conn).update_pool, request)
            return bool(again.current_status == "RUNNING" and not again.reconciling)

        await _poll(f"{pool.name!r} to be updated", wait, ready, output=args.output)
        if args.output == "text":
            print(f"VM pool {pool.name!r} is ready.")


async def list_pools(args: argparse.Namespace, conn: Connection) -> None:
    reply = await call(conn, stub(conn).list_pools, papi.ListPoolsRequest())
    pools = sorted(reply.pools, key=lambda p: p.name)
    columns = [
        "idx",
        "name",
        "current_status",
        "desired_status",
        "runtime",
        "intrinsic_os",
        "hardware_template",
        "tier",
    ]
    rows = [
        [
            i,
            p.name,
            p.current_status,
            p.desired_status,
            p.spec.runtime,
            p.spec.intrinsic_os,
            p.spec.hardware_template,
            p.spec.pool_tier,
        ]
        for i, p in enumerate(pools)
    ]
    print_rows(args, columns, rows)


async def list_tiers(args: argparse.Namespace, conn: Connection) -> None:
    reply = await call(conn, stub(conn).list_tiers, papi.ListTiersRequest())
    rows = [[i, t.name, t.description] for i, t in enumerate(reply.tiers)]
    print_rows(args, ["idx", "name", "description"], rows)


async def list_hwtemplates(args: argparse.Namespace, conn: Connection) -> None:
    reply = await call(
        conn, stub(conn).list_hardware_templates, papi.ListHardwareTemplatesRequest()
    )
    rows = [
        [i, t.name, t.description, str(t.has_gpu).lower()] for i, t in enumerate(reply.hw_templates)
    ]
    print_rows(args, ["idx", "name", "description", "has_gpu"], rows)


async def describe(args: argparse.Namespace, conn: Connection) -> None:
    pool = await listed(conn, args.pool)
    if pool is None:
        raise CliError("NOT_FOUND", f"pool {args.pool!r} not found", NOT_FOUND)
    if args.output == "json":
        print(json.dumps(pool_dict(pool), ensure_ascii=False))
    else:
        print(prototext(pool))


async def delete(args: argparse.Namespace, conn: Connection) -> None:
    wait = _wait_seconds(args)
    await call(conn, stub(conn).delete_pool, papi.DeletePoolRequest(name=args.pool))
    _state_done(args, "deleted", "VM pool will converge to deletion.")
    if wait > 0:

        async def gone() -> bool:
            got = await listed(conn, args.pool)
            return got is None or got.current_status == "DELETED"

        await _poll(f"{args.pool!r} to be deleted", wait, gone, output=args.output)
        if args.output == "text":
            print(f"VM pool {args.pool!r} has been deleted.")


def _state_done(args: argparse.Namespace, state: str, text: str) -> None:
    if args.output == "json":
        print(json.dumps({"pool": args.pool, "requested": state}, ensure_ascii=False))
    else:
        print(text)


def _state_command(
    rpc: str, request: type, state: str, text: str
) -> Callable[[argparse.Namespace, Connection], Awaitable[None]]:
    async def run(args: argparse.Namespace, conn: Connection) -> None:
        await call(conn, getattr(stub(conn), rpc), request(name=args.pool))
        _state_done(args, state, text)

    return run


async def leases_list(args: argparse.Namespace, conn: Connection) -> None:
    reply = await call(conn, stub(conn).list_leases, papi.ListLeasesRequest(pool_name=args.pool))
    if args.output == "json":
        out = [
            {
                "name": x.name,
                "pool_name": x.pool_name,
                "expiration_time": x.expiration_time.astimezone(UTC)
                .isoformat()
                .replace("+00:00", "Z"),
            }
            for x in reply.leases
        ]
        print(json.dumps(out, ensure_ascii=False))
        return
    rows = [
        [i, x.name, x.pool_name, go_time(x.expiration_time)] for i, x in enumerate(reply.leases)
    ]
    print(tab_table(["idx", "name", "pool", "expires"], rows))


async def leases_stop(args: argparse.Namespace, conn: Connection) -> None:
    await call(conn, stub(conn).stop_lease, papi.StopLeaseRequest(lease_name=args.lease))
    if args.output == "json":
        print(json.dumps({"lease": args.lease, "requested": "stop"}))
    else:
        print(f"VM lease {args.lease} will stop.")


# --- registration -------------------------------------------------------------------------

Subparsers = argparse._SubParsersAction  # argparse's type for add_subparsers()


def _nested(reg: Registry, parent: argparse.ArgumentParser, metavar: str) -> Subparsers[Any]:
    """The commands under ``parent``; the client flags go between the words too
    (`vmpool pool --server X list`), as everywhere."""
    add_connection_flags(parent.add_argument_group("client flags"), reg.env, top_level=False)
    sub = parent.add_subparsers(
        dest=metavar.lower().replace("-", "_"), metavar=metavar, help="what to do"
    )
    sub.required = True
    return sub


def _client_in(
    reg: Registry,
    sub: Subparsers[Any],
    name: str,
    handler: ClientHandler,
    *,
    help: str,
    examples: Sequence[str],
) -> argparse.ArgumentParser:
    """A client command under ``vmpool pool``, with the framework's client flags."""
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=HelpFormatter,
    )
    add_connection_flags(p.add_argument_group("client flags"), reg.env, top_level=False)
    p.set_defaults(func=lambda args: run_client(handler, args))
    return p


def _group_in(sub: Subparsers[Any], name: str, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        formatter_class=HelpFormatter,
    )
    return p


def _pool_flag(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--pool", required=required, default="", help="the pool's name (default: none)")


def _spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime", help="runtime version (default: unchanged on update; empty: the current one)"
    )
    p.add_argument(
        "--intrinsic-os",
        help="IntrinsicOS version (default: unchanged on update; empty: the current one)",
    )
    p.add_argument("--tier", help=f"the pool's tier (default: {DEFAULT_TIER})")
    p.add_argument(
        "--hwtemplate", help=f"the pool's hardware template (default: {DEFAULT_HW_TEMPLATE})"
    )
    _wait_flag(p)


def _wait_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait-timeout",
        metavar="DURATION",
        default="",
        help="wait this long for the change to finish, e.g. 10m (default: do not wait)",
    )


def register(reg: Registry) -> None:
    top = reg.local(
        "pool",
        lambda args: 2,
        help="manage pools at run time (VMPoolService, like inctl vm pool)",
        examples=[
            "vmpool pool create --pool my-pool --tier ad_hoc_single --wait-timeout 5m",
            "vmpool pool list",
            "vmpool pool delete --pool my-pool --wait-timeout 5m",
        ],
    )
    sub = _nested(reg, top, "POOL-COMMAND")

    p = _client_in(
        reg,
        sub,
        "create",
        create,
        help="create a pool from a tier and a hardware template",
        examples=[
            "vmpool pool create --pool my-pool",
            "vmpool pool create --pool my-pool --runtime intrinsic.platform.20261201.RC00 "
            "--tier ad_hoc_single --hwtemplate default --wait-timeout 5m",
        ],
    )
    _pool_flag(p, required=True)
    _spec_flags(p)
    p = _client_in(
        reg,
        sub,
        "update",
        update,
        help="change a pool's spec (only the flags given; none: no change)",
        examples=[
            "vmpool pool update --pool my-pool --runtime intrinsic.platform.20261202.RC01",
            'vmpool pool update --pool my-pool --runtime ""   # the current runtime',
        ],
    )
    _pool_flag(p, required=True)
    _spec_flags(p)
    _client_in(reg, sub, "list", list_pools, help="list the pools", examples=["vmpool pool list"])
    _client_in(
        reg,
        sub,
        "list-tiers",
        list_tiers,
        help="list the tiers",
        examples=["vmpool pool list-tiers"],
    )
    _client_in(
        reg,
        sub,
        "list-hwtemplates",
        list_hwtemplates,
        help="list the hardware templates",
        examples=["vmpool pool list-hwtemplates"],
    )
    p = _client_in(
        reg,
        sub,
        "describe",
        describe,
        help="show one pool",
        examples=["vmpool pool describe --pool my-pool --output json"],
    )
    _pool_flag(p, required=True)
    p = _client_in(
        reg,
        sub,
        "delete",
        delete,
        help="delete a pool: no new leases, free VMs destroyed, gone when no VM is left",
        examples=["vmpool pool delete --pool my-pool --wait-timeout 5m"],
    )
    _pool_flag(p, required=False)
    _wait_flag(p)
    for name, rpc, request, state, text, help_text in (
        (
            "stop",
            "stop_pool",
            papi.StopPoolRequest,
            "stopped",
            "VM pool will stop.",
            "no new leases; free VMs destroyed; STOPPED when no VM is left",
        ),
        (
            "pause",
            "pause_pool",
            papi.PausePoolRequest,
            "paused",
            "VM pool will pause.",
            "no new leases; free VMs destroyed; leased VMs keep running",
        ),
        (
            "resume",
            "resume_pool",
            papi.ResumePoolRequest,
            "running",
            "VM pool resumed.",
            "allow leases again and refill the pool",
        ),
    ):
        p = _client_in(
            reg,
            sub,
            name,
            _state_command(rpc, request, state, text),
            help=help_text,
            examples=[f"vmpool pool {name} --pool my-pool"],
        )
        _pool_flag(p, required=False)

    leases = _group_in(sub, "leases", "list and stop leases")
    lsub = _nested(reg, leases, "LEASES-COMMAND")
    p = _client_in(
        reg,
        lsub,
        "list",
        leases_list,
        help="the active leases of a pool",
        examples=["vmpool pool leases list --pool my-pool"],
    )
    p.add_argument("--pool", required=True, help="filter for leases in this pool")
    p = _client_in(
        reg,
        lsub,
        "stop",
        leases_stop,
        help="end a lease now and destroy its VM (no service tag needed)",
        examples=["vmpool pool leases stop --lease vmp-3f30-x9t7q72u"],
    )
    p.add_argument("--lease", required=True, help="the lease (instance) name")
