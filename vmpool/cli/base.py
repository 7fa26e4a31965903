"""The CLI framework: one registry every command module adds its subcommands to.

A module adds commands with one function, ``register(reg: Registry)``, listed in
vmpool/cli/__init__.py. ``reg.client(...)`` makes a command that talks to the server (it gets
the connection flags, error reporting and exit codes); ``reg.local(...)`` one that
does not (serve, migrate, render).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from grpclib.exceptions import GRPCError, StreamTerminatedError

from vmpool.cli import errors as cli_errors
from vmpool.cli.connection import Connection, add_connection_flags, connect
from vmpool.cli.errors import CliError
from vmpool.core.version import package_version

ClientHandler = Callable[[argparse.Namespace, Connection], Awaitable[None]]
LocalHandler = Callable[[argparse.Namespace], int]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and shows each flag's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = "default:" in text or "%(default)" in text
        if (
            not shown
            and action.default not in (None, False, "", argparse.SUPPRESS)
            and (action.option_strings)
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Usage mistakes exit 2 with one line (one JSON object with --output json)."""

    json_errors = False

    def error(self, message: str) -> Any:
        self.exit_with(cli_errors.usage(f"{self.prog}: {message}"))

    def exit_with(self, err: CliError) -> Any:
        if not _Parser.json_errors:
            self.print_usage(sys.stderr)
        raise SystemExit(cli_errors.report(err, "json" if _Parser.json_errors else "text"))


def _examples(lines: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


class Registry:
    """The top-level parser and its subcommands."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.parser = _Parser(
            prog="vmpool",
            description="Pools of pre-warmed VMs, leased over gRPC: the server, its "
            "migrations, and client commands like `inctl vm`.",
            epilog=_examples(
                [
                    "vmpool serve                      # the demo: nothing to install",
                    "vmpool lease --output json",
                    "vmpool --server vmpool:50051 status",
                    "vmpool COMMAND --help             # each command's flags",
                ]
            ),
            formatter_class=HelpFormatter,
        )
        self.parser.add_argument(
            "--version", action="version", version=f"vmpool {package_version()}"
        )
        add_connection_flags(
            self.parser.add_argument_group("client flags (every client command)"),
            env,
            top_level=True,
        )
        self._sub = self.parser.add_subparsers(dest="command", metavar="COMMAND")
        self._sub.required = True

    def _add(
        self, name: str, help: str, description: str | None, examples: Sequence[str]
    ) -> argparse.ArgumentParser:
        if not examples:
            raise ValueError(f"command {name!r}: give at least one example")
        p: argparse.ArgumentParser = self._sub.add_parser(
            name,
            help=help,
            description=description or help[0].upper() + help[1:] + ".",
            epilog=_examples(examples),
            formatter_class=HelpFormatter,
        )
        return p

    def local(
        self,
        name: str,
        handler: LocalHandler,
        *,
        help: str,
        examples: Sequence[str],
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        """A command that does not call the server; ``handler`` returns the exit
        code or raises CliError (reported as --output says)."""
        p = self._add(name, help, description, examples)
        p.set_defaults(func=lambda args: run_local(handler, args))
        return p

    def client(
        self,
        name: str,
        handler: ClientHandler,
        *,
        help: str,
        examples: Sequence[str],
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        """A command that calls the server; ``handler`` raises CliError or GRPCError."""
        p = self._add(name, help, description, examples)
        add_connection_flags(p.add_argument_group("client flags"), self.env, top_level=False)
        p.set_defaults(func=lambda args: run_client(handler, args))
        return p


def run_local(handler: LocalHandler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except CliError as err:
        return cli_errors.report(err, args.output)


def run_client(handler: ClientHandler, args: argparse.Namespace) -> int:
    """Run ``handler`` on a connection; every failure becomes one line and an exit code."""

    async def call() -> None:
        async with connect(args) as conn:
            await handler(args, conn)

    try:
        asyncio.run(call())
    except CliError as err:
        return cli_errors.report(err, args.output)
    except GRPCError as err:
        return cli_errors.report(cli_errors.from_status(err.status, err.message or ""), args.output)
    except BrokenPipeError as err:
        if _stdout_gone():  # `vmpool ... | head`: the reader left; not the server's fault
            return _quiet_after_broken_stdout()
        return cli_errors.report(
            CliError("UNAVAILABLE", f"cannot reach {args.server}: {err}", cli_errors.UNAVAILABLE),
            args.output,
        )
    except (OSError, StreamTerminatedError, TimeoutError) as err:
        why = str(err) or type(err).__name__
        return cli_errors.report(
            CliError("UNAVAILABLE", f"cannot reach {args.server}: {why}", cli_errors.UNAVAILABLE),
            args.output,
        )
    except KeyboardInterrupt:
        return cli_errors.report(
            CliError("CANCELLED", "interrupted", cli_errors.INTERRUPTED), args.output
        )
    return cli_errors.OK


def _stdout_gone() -> bool:
    """True when stdout is a pipe whose reader has closed it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _quiet_after_broken_stdout() -> int:
    """Exit as a tool killed by SIGPIPE would, without Python's "Exception ignored" at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return cli_errors.BROKEN_PIPE


def _wants_json(argv: Sequence[str]) -> bool:
    for i, a in enumerate(argv):
        if a in ("--output", "-o") and i + 1 < len(argv):
            return argv[i + 1] == "json"
        if a in ("--output=json", "-ojson"):
            return True
    return False


def run(registry: Registry, argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = _wants_json(argv)
    args = registry.parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return cli_errors.report(
            cli_errors.local_failure("interrupted", cli_errors.INTERRUPTED), args.output
        )
    return code


def default_env() -> dict[str, str]:
    return dict(os.environ)
