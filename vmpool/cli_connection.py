"""How client commands reach the server: the connection flags and the channel.

Every flag here is accepted before or after the subcommand (`vmpool --server X ping`
and `vmpool ping --server X`). TLS and credentials flags (--tls, --ca, --cert, --key,
--token, --token-file) belong in ``add_connection_flags`` and are applied in
``connect``: the commands themselves never build channels or metadata.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from grpclib.client import Channel

from vmpool.cli_errors import usage
from vmpool.durations import parse_duration
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.proto.vmpool.admin import v1 as adm

DEFAULT_SERVER = "localhost:50051"
DEFAULT_TAG = "vmpool-cli"
DEFAULT_TIMEOUT = "10s"


def add_connection_flags(
    group: argparse._ArgumentGroup, env: Mapping[str, str], top_level: bool
) -> None:
    """Add the flags every client command shares to ``group``.

    Defined twice: on the top-level parser (with the defaults) and on each
    subcommand (``top_level=False``: no default, so a flag given before the
    subcommand is not overwritten by the subcommand's default).
    """
    server = env.get("VMPOOL_SERVER", DEFAULT_SERVER)
    tag = env.get("VMPOOL_SERVICE_TAG", DEFAULT_TAG)

    def default(value: object) -> object:
        return value if top_level else argparse.SUPPRESS

    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=default(server),
        help=f"the vmpool server (env VMPOOL_SERVER; default: {server})",
    )
    group.add_argument(
        "--service-tag",
        metavar="TAG",
        default=default(tag),
        help=f"who is asking; leases can be returned only with the same tag "
        f"(env VMPOOL_SERVICE_TAG; default: {tag or '(empty)'})",
    )
    group.add_argument(
        "--output",
        "-o",
        choices=["text", "json"],
        default=default("text"),
        help="text for people, json for scripts: one JSON value on stdout, "
        "errors as one JSON object on stderr (default: text)",
    )
    group.add_argument(
        "--timeout",
        metavar="DURATION",
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call, e.g. 5s (default: {DEFAULT_TIMEOUT})",
    )
    # Identity: --tls, --ca, --cert, --key, --token, --token-file go here.


@dataclass
class Connection:
    """An open channel with the stubs and per-call settings client commands use."""

    channel: Channel
    timeout: float
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def lease(self) -> api.VmPoolLeaseServiceStub:
        return api.VmPoolLeaseServiceStub(self.channel)

    @property
    def admin(self) -> adm.VmPoolAdminServiceStub:
        return adm.VmPoolAdminServiceStub(self.channel)

    @property
    def extension(self) -> adm.VmPoolExtensionServiceStub:
        return adm.VmPoolExtensionServiceStub(self.channel)

    def call_metadata(self, extra: Mapping[str, str] | None = None) -> dict[str, str] | None:
        out = {**self.metadata, **(extra or {})}
        return out or None


def parse_server(server: str) -> tuple[str, int]:
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage(f"--server: {server!r} is not HOST:PORT")
    return host.strip("[]") or "localhost", int(port)


def timeout_seconds(args: argparse.Namespace) -> float:
    try:
        return parse_duration(args.timeout).total_seconds()
    except ValueError as err:
        raise usage(f"--timeout: {err}") from None


@asynccontextmanager
async def connect(args: argparse.Namespace) -> AsyncIterator[Connection]:
    host, port = parse_server(args.server)
    timeout = timeout_seconds(args)
    channel = Channel(host, port)
    try:
        yield Connection(channel, timeout)
    finally:
        channel.close()
