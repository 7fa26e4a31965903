"""`vmpool pool ...` (like `inctl vm pool ...`) and the ad-hoc `vmpool lease --runtime`.

Flags and output follow pool-api-research.md section 2: Pools print as
multi-line prototext, lists as TAB-separated tables with an idx column,
`--output json` prints JSON with the proto's field names, and `--wait-timeout`
polls until the pool is ready (create, update) or gone (delete).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import re
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from betterproto.lib.google.protobuf import FieldMask
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmpool.cli.base import ClientHandler, HelpFormatter, Registry, run_client
from vmpool.cli.connection import Connection, add_connection_flags
from vmpool.cli.errors import NOT_FOUND, CliError, usage
from vmpool.core.durations import parse_duration
from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api

DEFAULT_TIER = "ad_hoc_single"
DEFAULT_HW_TEMPLATE = "default"
POLL_EVERY = 2.0  # seconds between --wait-timeout polls (inctl: 10 s)
AD_HOC_RETRY = 1.0  # seconds between ad-hoc Lease attempts while the pool is not known yet
AD_HOC_SERVER_WAIT = 20  # seconds of server-side wait per Lease once queued
AD_HOC_TIMEOUT = timedelta(minutes=20)  # inctl vm lease --timeout
CLEANUP_TIMEOUT = 30.0
# (flag attribute, Spec field): the order inctl puts mask paths in.
SPEC_FLAGS = [
    ("runtime", "runtime"),
    ("intrinsic_os", "intrinsic_os"),
    ("tier", "pool_tier"),
    ("hwtemplate", "hardware_template"),
]


def stub(conn: Connection) -> papi.VmPoolServiceStub:
    return papi.VmPoolServiceStub(conn.channel)


async def _call(conn: Connection, method: Callable[..., Awaitable[Any]], request: Any) -> Any:
    return await method(request, timeout=conn.timeout, metadata=conn.call_metadata())


# --- output ---------------------------------------------------------------------------


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def prototext(pool: papi.Pool) -> str:
    """The Pool as multi-line prototext (default values omitted, as protobuf does)."""
    lines = []
    for key in ("name", "current_status", "desired_status"):
        if getattr(pool, key):
            lines.append(f"{key}: {_quote(getattr(pool, key))}")
    spec = [f"  {k}: {_quote(v)}" for k, v in pool_dict(pool)["spec"].items() if v]
    if spec:
        lines += ["spec {", *spec, "}"]
    if pool.reconciling:
        lines.append("reconciling: true")
    return "\n".join(lines)


def pool_dict(pool: papi.Pool) -> dict[str, Any]:
    """protojson with proto field names and every field."""
    return {
        "name": pool.name,
        "current_status": pool.current_status,
        "desired_status": pool.desired_status,
        "spec": {
            "runtime": pool.spec.runtime,
            "intrinsic_os": pool.spec.intrinsic_os,
            "hardware_template": pool.spec.hardware_template,
            "pool_tier": pool.spec.pool_tier,
        },
        "reconciling": pool.reconciling,
    }


def print_pool(args: argparse.Namespace, pool: papi.Pool, headline: str) -> None:
    if args.output == "json":
        print(json.dumps(pool_dict(pool), ensure_ascii=False))
        return
    print(headline)
    print(prototext(pool))


def tab_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["\t".join(columns)]
    out += ["\t".join(str(v) for v in row) for row in rows]
    return "\n".join(out)


def print_rows(args: argparse.Namespace, columns: Sequence[str], rows: list[list[Any]]) -> None:
    if args.output == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], ensure_ascii=False))
        return
    print(tab_table(columns, rows))


def go_time(ts: datetime) -> str:
    """Go's Time.String() in UTC, as inctl prints lease expiries."""
    utc = ts.astimezone(UTC)
    frac = f".{utc.microsecond:06d}".rstrip("0") if utc.microsecond else ""
    return utc.strftime("%Y-%m-%d %H:%M:%S") + frac + " +0000 UTC"


def _progress(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


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
        _progress(f"Waiting for VM pool {what}", end="")
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await probe():
                if output == "text":
                    _progress("")
                return
            if output == "text":
                _progress(".", end="")
        except GRPCError as err:
            if output == "text":
                _progress(f"? (error: {err.status.name}: {err.message}, retrying)", end="")
        if time.monotonic() + POLL_EVERY > deadline:
            raise CliError("DEADLINE_EXCEEDED", f"--wait-timeout: VM pool not {what} in time", 6)
        await asyncio.sleep(POLL_EVERY)


async def _listed(conn: Connection, name: str) -> papi.Pool | None:
    reply = await _call(conn, stub(conn).list_pools, papi.ListPoolsRequest())
    return next((p for p in reply.pools if p.name == name), None)


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
    pool = await _call(conn, stub(conn).create_pool, papi.CreatePoolRequest(args.pool, spec))
    print_pool(args, pool, "VM pool created.")
    if wait > 0:

        async def ready() -> bool:
            got = await _listed(conn, pool.name)
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
    pool = await _call(conn, stub(conn).update_pool, request)
    if not pool.name:
        print("VM pool unchanged.")
        return
    print_pool(
        args, pool, "VM Pool update in progress..." if pool.reconciling else "VM pool updated."
    )
    if wait > 0:

        async def ready() -> bool:
            again = await _call(conn, stub(conn).update_pool, request)
            return bool(again.current_status == "RUNNING" and not again.reconciling)

        await _poll(f"{pool.name!r} to be updated", wait, ready, output=args.output)
        if args.output == "text":
            print(f"VM pool {pool.name!r} is ready.")


async def list_pools(args: argparse.Namespace, conn: Connection) -> None:
    reply = await _call(conn, stub(conn).list_pools, papi.ListPoolsRequest())
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
    reply = await _call(conn, stub(conn).list_tiers, papi.ListTiersRequest())
    rows = [[i, t.name, t.description] for i, t in enumerate(reply.tiers)]
    print_rows(args, ["idx", "name", "description"], rows)


async def list_hwtemplates(args: argparse.Namespace, conn: Connection) -> None:
    reply = await _call(
        conn, stub(conn).list_hardware_templates, papi.ListHardwareTemplatesRequest()
    )
    rows = [
        [i, t.name, t.description, str(t.has_gpu).lower()] for i, t in enumerate(reply.hw_templates)
    ]
    print_rows(args, ["idx", "name", "description", "has_gpu"], rows)


async def describe(args: argparse.Namespace, conn: Connection) -> None:
    pool = await _listed(conn, args.pool)
    if pool is None:
        raise CliError("NOT_FOUND", f"pool {args.pool!r} not found", NOT_FOUND)
    if args.output == "json":
        print(json.dumps(pool_dict(pool), ensure_ascii=False))
    else:
        print(prototext(pool))


async def delete(args: argparse.Namespace, conn: Connection) -> None:
    wait = _wait_seconds(args)
    await _call(conn, stub(conn).delete_pool, papi.DeletePoolRequest(name=args.pool))
    _state_done(args, "deleted", "VM pool will converge to deletion.")
    if wait > 0:

        async def gone() -> bool:
            got = await _listed(conn, args.pool)
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
        await _call(conn, getattr(stub(conn), rpc), request(name=args.pool))
        _state_done(args, state, text)

    return run


async def leases_list(args: argparse.Namespace, conn: Connection) -> None:
    reply = await _call(conn, stub(conn).list_leases, papi.ListLeasesRequest(pool_name=args.pool))
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
    await _call(conn, stub(conn).stop_lease, papi.StopLeaseRequest(lease_name=args.lease))
    if args.output == "json":
        print(json.dumps({"lease": args.lease, "requested": "stop"}))
    else:
        print(f"VM lease {args.lease} will stop.")


# --- the ad-hoc lease (`vmpool lease --runtime R / --intrinsic-os O`) ----------------------

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
                _progress(".", end="")
            else:
                if booting:
                    _progress("")
                booting = False
                if args.output == "text":
                    _progress(f"lease request did not succeed yet, retrying soon: {err.message}")
            if booting or err.status is not Status.RESOURCE_EXHAUSTED:
                await asyncio.sleep(AD_HOC_RETRY)


async def ad_hoc_lease(args: argparse.Namespace, conn: Connection) -> dict[str, Any]:
    """Create a throw-away pool, lease from it, delete it (also when interrupted);
    the lease as `vmpool lease` prints it."""
    from vmpool.cli.lease import describe

    if args.pool:
        raise usage("--pool: not with --runtime / --intrinsic-os (they make their own pool)")
    name = ad_hoc_pool_name(_current_user())
    spec = papi.Spec(
        runtime=args.runtime or "",
        intrinsic_os=args.intrinsic_os or "",
        pool_tier=DEFAULT_TIER,
        hardware_template=DEFAULT_HW_TEMPLATE,
    )
    pool = await _call(conn, stub(conn).create_pool, papi.CreatePoolRequest(name, spec))
    _progress(
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
        _progress(
            f"could not delete temporary pool {name}: {err}; run: vmpool pool delete --pool {name}"
        )
        return
    _progress(f"Cleaned up temporary pool {name}")


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


# --- `vmpool render` for API pools -----------------------------------------------------------


def add_render_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tier", help="render an API pool of this tier (default: ad_hoc_single with --hwtemplate)"
    )
    p.add_argument(
        "--hwtemplate",
        help="render an API pool of this hardware template, without the database "
        "(default: look the pool up in the database when it is not in the file)",
    )
    p.add_argument("--runtime", help="with --hwtemplate: the runtime (default: versions.runtime)")
    p.add_argument(
        "--intrinsic-os",
        help="with --hwtemplate: the IntrinsicOS (default: versions.intrinsic_os)",
    )


def render_api_pool(args: argparse.Namespace, config: Any) -> int:
    """Print the VM an API pool gets: from --tier/--hwtemplate/--runtime/--intrinsic-os
    (offline), or from its stored spec in the configured database."""
    from vmpool.domain import pools
    from vmpool.domain.leasing import ClientError
    from vmpool.providers.kubevirt_manifest import render_preview

    try:
        if args.tier or args.hwtemplate or args.runtime or args.intrinsic_os:
            spec = pools.resolve_spec(
                config,
                pools.PoolSpec(
                    args.runtime or "",
                    args.intrinsic_os or "",
                    args.hwtemplate or "",
                    args.tier or "",
                ),
            )
        else:
            stored = _stored_spec(config, args.pool)
            if stored is None:
                return _render_fail(
                    f'--pool: no pool named "{args.pool}" in {args.config} or in its database '
                    "(or give --hwtemplate to render an API pool without the database)"
                )
            spec = stored
        cfg = pools.pool_config_for(config, args.pool, spec)
    except ClientError as err:
        return _render_fail(str(err).removeprefix("spec.").replace("pool_tier", "--tier", 1))
    if cfg is None:
        return _render_fail(f'--pool: "{args.pool}" uses a tier or template not in {args.config}')
    print(render_preview(config, cfg), end="")
    return 0


def _render_fail(message: str) -> int:
    print(f"vmpool: {message}", file=sys.stderr)
    return 2


def _stored_spec(config: Any, name: str) -> Any:
    """An API pool's spec from the database of ``config`` (None: not there, or no database)."""
    if not config.database_url:
        return None
    from vmpool.domain import pools
    from vmpool.store.db import create_pool
    from vmpool.store.pools import PoolStore

    async def fetch() -> Any:
        db = await create_pool(config.database_url, min_size=1, max_size=1)
        try:
            return await PoolStore(db).get(name)
        finally:
            await db.close()

    row = asyncio.run(fetch())
    if row is None or not row.is_api:
        return None
    return pools.PoolSpec.of(row)


# --- registration -------------------------------------------------------------------------

Subparsers = argparse._SubParsersAction  # argparse's type for add_subparsers()


def _nested(parent: argparse.ArgumentParser, metavar: str) -> Subparsers[Any]:
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
    # Client flags between the words too (`vmpool pool --server X list`), as everywhere.
    add_connection_flags(top.add_argument_group("client flags"), reg.env, top_level=False)
    sub = _nested(top, "POOL-COMMAND")

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
    add_connection_flags(leases.add_argument_group("client flags"), reg.env, top_level=False)
    lsub = _nested(leases, "LEASES-COMMAND")
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
