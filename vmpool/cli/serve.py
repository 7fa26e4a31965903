"""`vmpool serve`, `vmpool migrate`, `vmpool render`: the commands that run locally."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from vmpool.cli import errors as cli_errors
from vmpool.cli.base import Registry
from vmpool.cli.connection import add_output_flag
from vmpool.cli.errors import local_failure
from vmpool.config.loading import ConfigError, load_config
from vmpool.core import eventloop


def _load_config(path: str | None, flags: dict[str, str] | None = None) -> Any:
    try:
        return load_config(path, dict(os.environ), flags)
    except ConfigError as err:  # every mistake at once, one line each
        lines = "\n".join(f"bad config: {line}" for line in err.lines())
        raise local_failure(lines, cli_errors.USAGE) from None


def _database_url(config: Any) -> tuple[str, Any]:
    """The configured database, or an embedded one under data_dir."""
    if config.database_url:
        return config.database_url, None
    from vmpool.store.embedded import EmbeddedPostgres  # lazy: pgserver, for the demo only

    embedded = EmbeddedPostgres(config.data_dir)
    try:
        return embedded.start(), embedded
    except (OSError, RuntimeError) as err:
        raise local_failure(
            f"cannot start the embedded PostgreSQL under {config.data_dir}: {err}",
            cli_errors.FAILURE,
        ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    flags = {"listen": args.listen} if args.listen else {}
    if args.metrics_listen is not None:
        flags["metrics_listen"] = args.metrics_listen
    config = _load_config(args.config, flags)
    # lazy: the server's modules load for `vmpool serve` only (CLI start-up time)
    from vmpool.app import AddressInUse, FatalError, SettingNotMet, StartupError, serve
    from vmpool.ops import logs

    logs.setup(config.log_level)
    if args.config is None:
        print(
            "vmpool: no --config given: running the demo (embedded PostgreSQL under "
            f"{config.data_dir}, fake provider, pool 'small')",
            file=sys.stderr,
        )
    from vmpool.store.errors import StoreError  # lazy: asyncpg (CLI start-up time)

    url, embedded = _database_url(config)
    try:
        eventloop.run(
            serve(
                config,
                url,
                role=args.role,
                reuse_port=args.reuse_port,
                on_forced_exit=embedded.stop_now if embedded is not None else None,
            )
        )
    except AddressInUse as err:
        flag = {"listen": "--listen", "metrics_listen": "--metrics-listen"}.get(str(err).split()[0])
        hint = f" (another process has it: choose another address with {flag})" if flag else ""
        raise local_failure(f"cannot start: {err}{hint}", cli_errors.USAGE) from None
    except SettingNotMet as err:
        raise local_failure(f"cannot start: {err}", cli_errors.USAGE) from None
    except StartupError as err:
        raise local_failure(f"cannot start: {err}", cli_errors.FAILURE) from None
    except FatalError as err:
        raise local_failure(f"stopped after a fatal error: {err}", cli_errors.FAILURE) from None
    except StoreError as err:
        raise local_failure(f"cannot start: database_url: {err}", cli_errors.UNAVAILABLE) from None
    except OSError as err:  # e.g. the port is taken
        raise local_failure(f"cannot start: {err.strerror or err}", cli_errors.FAILURE) from None
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    # lazy: asyncpg loads for `vmpool migrate` only (CLI start-up time)
    from vmpool.store.db import create_pool, migrate
    from vmpool.store.errors import StoreError

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
    except StoreError as err:
        raise local_failure(
            f"cannot migrate: database_url: {err}", cli_errors.UNAVAILABLE
        ) from None
    except OSError as err:
        raise local_failure(
            f"cannot migrate: {err.strerror or err}", cli_errors.UNAVAILABLE
        ) from None
    finally:
        if embedded is not None:
            embedded.stop()
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    # lazy: asyncpg and the manifest code load for `vmpool render` only (CLI start-up time)
    from vmpool.cli.render_pool import render_api_pool
    from vmpool.providers.kubevirt_manifest import render_pool_preview

    if config.pool(args.pool) is None or args.tier or args.hwtemplate:
        return render_api_pool(args, config)  # an API pool: from the flags or the database
    print(render_pool_preview(config, args.pool), end="")
    return 0


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


def register(reg: Registry) -> None:
    config_help = "YAML config file (default: none, which runs the demo)"
    p = reg.local(
        "serve",
        cmd_serve,
        help="run the server",
        description="Run the gRPC server, its metrics endpoint and the background "
        "reconciler. With no --config: the demo (embedded PostgreSQL, fake provider, "
        "one pool 'small').",
        examples=[
            "vmpool serve",
            "vmpool serve --config /etc/vmpool/config.yaml",
            "vmpool serve --metrics-listen 127.0.0.1:9191   # the demo, 9090 being taken",
            "vmpool serve --config /etc/vmpool/config.yaml --role reconciler",
        ],
    )
    p.add_argument("--config", metavar="FILE", help=config_help)
    add_output_flag(p, top_level=False)
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address for gRPC, overriding the config's listen (default: the config's, "
        "0.0.0.0:50051 unless set; the demo's 127.0.0.1:50051)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help='address for /metrics, overriding the config\'s metrics_listen; "" turns '
        "it off, e.g. when Prometheus has 9090 (default: the config's, 0.0.0.0:9090 "
        "unless set; the demo's 127.0.0.1:9090)",
    )
    p.add_argument(
        "--role",
        choices=("all", "api", "reconciler"),
        default="all",
        help="all: serve RPCs and run the background work when leader; api: RPCs only; "
        "reconciler: the background work only, no gRPC port (default: all)",
    )
    p.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the gRPC port with other processes (SO_REUSEPORT); without it a "
        "busy port stops start-up with exit status 2",
    )

    p = reg.local(
        "migrate",
        cmd_migrate,
        help="apply database migrations and exit",
        description="Apply pending database migrations and exit. The server applies "
        "them at start too; this is for a separate migration step (the chart's Job).",
        examples=["vmpool migrate --config /etc/vmpool/config.yaml"],
    )
    p.add_argument("--config", metavar="FILE", help=config_help)
    add_output_flag(p, top_level=False)

    p = reg.local(
        "render",
        cmd_render,
        help="print the VirtualMachine a pool would create",
        examples=[
            "vmpool render --config config.yaml --pool small",
            "vmpool render --config config.yaml --pool my-api-pool     # from the database",
            "vmpool render --config config.yaml --pool x --hwtemplate default --runtime R",
        ],
    )
    p.add_argument("--config", metavar="FILE", required=True, help="YAML config file")
    add_output_flag(p, top_level=False)
    p.add_argument("--pool", metavar="NAME", required=True, help="a pool of that file")
    add_render_flags(p)
