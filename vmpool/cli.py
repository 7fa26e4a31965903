"""The `vmpool` command: the server, migrations, and client commands like `inctl vm`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

from vmpool.config import ConfigError


def _config_or_exit(path: str | None) -> Any:
    from vmpool.config import load_config

    try:
        return load_config(path, dict(os.environ))
    except ConfigError as err:
        print(f"vmpool: bad config: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _database_url(config: Any) -> tuple[str, Any]:
    """The configured database, or an embedded one under data_dir."""
    if config.database_url:
        return config.database_url, None
    from vmpool.store.db import EmbeddedPostgres

    embedded = EmbeddedPostgres(config.data_dir)
    return embedded.start(), embedded


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    if args.listen:
        from vmpool.config import parse_config

        try:
            parse_config({"listen": args.listen})
        except ConfigError as err:
            print(f"vmpool: --listen: {str(err).split(': ', 2)[-1]}", file=sys.stderr)
            return 2
    from vmpool import logs
    from vmpool.app import StartupError, serve

    logs.setup(config.log_level)
    if args.config is None:
        print(
            "vmpool: no --config given: running the demo (embedded PostgreSQL under "
            f"{config.data_dir}, fake provider, pool 'small')",
            file=sys.stderr,
        )
    url, embedded = _database_url(config)
    try:
        asyncio.run(serve(config, url, listen=args.listen))
    except StartupError as err:
        print(f"vmpool: cannot start: {err}", file=sys.stderr)
        return 1
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    from vmpool.store.db import create_pool, migrate

    url, embedded = _database_url(config)

    async def run() -> list[str]:
        pool = await create_pool(url, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                return await migrate(conn)
        finally:
            await pool.close()

    try:
        applied = asyncio.run(run())
    finally:
        if embedded is not None:
            embedded.stop()
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    from vmpool.providers.kubevirt_manifest import render_pool_preview

    if config.pool(args.pool) is None:
        print(f'vmpool: --pool: no pool named "{args.pool}" in {args.config}', file=sys.stderr)
        return 2
    print(render_pool_preview(config, args.pool), end="")
    return 0


def _client(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    func: Callable[[argparse.Namespace], Any],
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument(
        "--server",
        default=os.environ.get("VMPOOL_SERVER", "localhost:50051"),
        help="HOST:PORT (env VMPOOL_SERVER)",
    )
    p.add_argument(
        "--service-tag",
        default=os.environ.get("VMPOOL_SERVICE_TAG", "vmpool-cli"),
        help="who is asking (env VMPOOL_SERVICE_TAG)",
    )
    p.add_argument("--output", choices=["text", "json"], default="text")
    p.add_argument("--timeout", default="10s", help="per-call deadline")
    p.set_defaults(func=lambda a: _run_client(func, a))
    return p


def _run_client(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    from grpclib.exceptions import GRPCError, StreamTerminatedError

    try:
        asyncio.run(func(args))
    except GRPCError as err:
        print(f"vmpool: {err.status.name}: {err.message}", file=sys.stderr)
        return 1
    except (OSError, StreamTerminatedError, TimeoutError) as err:
        print(f"vmpool: cannot reach {args.server}: {err or type(err).__name__}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"vmpool: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vmpool import client

    parser = argparse.ArgumentParser(prog="vmpool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--config", help="YAML config; none: the demo")
    p.add_argument("--listen", help="HOST:PORT for gRPC (overrides listen)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="apply database migrations and exit")
    p.add_argument("--config")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("render", help="print the VirtualMachine a pool would create")
    p.add_argument("--config", required=True)
    p.add_argument("--pool", required=True)
    p.set_defaults(func=cmd_render)

    _client(sub, "ping", "check the server and its database", client.ping)
    _client(sub, "pools", "list pools", client.pools)
    p = _client(sub, "lease", "lease a VM", client.lease)
    p.add_argument("--pool", default="")
    p.add_argument("--duration", help="e.g. 30m (default: the pool's default_lease)")
    p.add_argument("--reservation-id", help="UUID; keeps your place in the queue")
    p.add_argument("--wait", help="keep trying this long (e.g. 20m), showing the queue position")
    p = _client(sub, "get", "show an instance's lease", client.get)
    p.add_argument("instance")
    p = _client(sub, "extend", "move a lease's expiry to now + DURATION", client.extend)
    p.add_argument("instance")
    p.add_argument("duration")
    p.add_argument("--extend-only", action="store_true", help="never shorten the lease")
    p = _client(sub, "return", "return a VM (it is destroyed)", client.return_)
    p.add_argument("instance")

    _client(sub, "status", "pools as a table (admin API)", client.status)
    p = _client(sub, "admin", "operator commands (admin API)", client.admin)
    p.add_argument("action", choices=["leases", "reservations", "force-return", "drain", "undrain"])
    p.add_argument(
        "target",
        nargs="?",
        default="",
        help="pool (leases, reservations, drain, undrain) or instance (force-return)",
    )
    p.add_argument("--reason", default="", help="force-return: why, for the logs")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))
