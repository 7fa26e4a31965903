"""The `vmpool` command (the composition root of the CLI).

Each module of commands registers itself with one call below; the framework
(common flags, help, exit codes, errors) is vmpool/cli/base.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmpool.cli import admin as cli_admin
from vmpool.cli import lease as cli_lease
from vmpool.cli import pool as cli_pool
from vmpool.cli import reservation as cli_reservation
from vmpool.cli import serve as cli_server
from vmpool.cli import watch as cli_watch
from vmpool.cli.base import Registry, default_env, run


def build_parser(env: dict[str, str] | None = None) -> Registry:
    reg = Registry(default_env() if env is None else env)
    cli_server.register(reg)
    cli_lease.register(reg)
    cli_admin.register(reg)
    cli_pool.register(reg)
    cli_reservation.register(reg)
    cli_watch.register(reg)
    return reg


def main(argv: Sequence[str] | None = None) -> None:
    raise SystemExit(run(build_parser(), argv))
