"""How client commands reach the server: the connection flags and the channel.

Every flag here is accepted before or after the subcommand (`vmpool --server X ping`
and `vmpool ping --server X`). TLS and credentials flags (--tls, --ca, --cert, --key,
--token, --token-file) belong in ``add_connection_flags`` and are applied in
``connect``: the commands themselves never build channels or metadata.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from grpclib.client import Channel
from grpclib.config import Configuration

from vmpool.cli.errors import usage
from vmpool.core.address import split_host_port
from vmpool.core.durations import parse_duration
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.proto.vmpool.admin import v1 as adm

DEFAULT_SERVER = "localhost:50051"
DEFAULT_TAG = "vmpool-cli"
DEFAULT_TIMEOUT = "10s"


def add_output_flag(group: argparse._ActionsContainer, top_level: bool) -> None:
    """--output, for client and local commands alike (see add_connection_flags)."""
    group.add_argument(
        "--output",
        "-o",
        choices=["text", "json"],
        default="text" if top_level else argparse.SUPPRESS,
        help="text for people, json for scripts: one JSON value on stdout, "
        "errors as one JSON object on stderr (default: text)",
    )


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
    add_output_flag(group, top_level)
    group.add_argument(
        "--timeout",
        metavar="DURATION",
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call, e.g. 5s (default: {DEFAULT_TIMEOUT})",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="speak TLS (implied by --ca, --cert)",
    )
    group.add_argument(
        "--ca",
        metavar="FILE",
        default=default(""),
        help="CA bundle to verify the server (PEM; default: the system's)",
    )
    group.add_argument(
        "--cert",
        metavar="FILE",
        default=default(""),
        help="client certificate (PEM), for mTLS (default: none)",
    )
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=default(""),
        help="name to verify in the server's certificate (default: the --server host)",
    )
    group.add_argument(
        "--key", metavar="FILE", default=default(""), help="key of --cert (PEM; default: none)"
    )
    group.add_argument(
        "--token",
        metavar="TOKEN",
        default=default(env.get("VMPOOL_TOKEN", "")),
        help="bearer token sent as `authorization: Bearer` (env VMPOOL_TOKEN; default: none)",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(""),
        help="read the bearer token from FILE, e.g. a projected ServiceAccount token "
        "(default: none)",
    )


@dataclass
class Connection:
    """An open channel with the stubs and per-call settings client commands use."""

    channel: Channel
    timeout: float
    metadata: dict[str, str] = field(default_factory=dict)
    # How this command reached the server, for commands it prints to run next.
    flags: tuple[str, ...] = ()

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
    try:
        host, port = split_host_port(server, "localhost")
    except ValueError as err:
        raise usage(f"--server: {err}") from None
    if port == 0:
        raise usage(f"--server: {server!r} is not HOST:PORT")
    return host, port


def timeout_seconds(args: argparse.Namespace) -> float:
    try:
        return parse_duration(args.timeout).total_seconds()
    except ValueError as err:
        raise usage(f"--timeout: {err}") from None


def client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client's TLS context from --tls/--ca/--cert/--key; None for plaintext."""
    ca, cert, key = getattr(args, "ca", ""), getattr(args, "cert", ""), getattr(args, "key", "")
    if not (getattr(args, "tls", False) or ca or cert or getattr(args, "tls_server_name", "")):
        return None
    if bool(cert) != bool(key):
        raise usage("--cert and --key go together")
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
        if cert:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise usage(f"--ca/--cert/--key: {err}") from None
    ctx.set_alpn_protocols(["h2"])
    return ctx


def reconnect_flags(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, ...]:
    """The flags that reach the same server as ``args`` did, for a printed
    command: never a token itself (one from the environment carries over)."""
    flags = ["--server", args.server]
    for flag in ("ca", "cert", "key", "tls_server_name", "token_file"):
        if value := getattr(args, flag, ""):
            flags += ["--" + flag.replace("_", "-"), value]
    if getattr(args, "tls", False) and len(flags) == 2:
        flags.append("--tls")
    token = getattr(args, "token", "")
    if token and not getattr(args, "token_file", "") and env.get("VMPOOL_TOKEN") != token:
        flags += ["--token", "TOKEN"]
    return tuple(flags)


def auth_metadata(args: argparse.Namespace) -> dict[str, str]:
    token = getattr(args, "token", "")
    path = getattr(args, "token_file", "")
    if path:
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as err:
            raise usage(f"--token-file: cannot read {path}: {err.strerror}") from None
    return {"authorization": f"Bearer {token}"} if token else {}


@asynccontextmanager
async def connect(args: argparse.Namespace) -> AsyncIterator[Connection]:
    host, port = parse_server(args.server)
    timeout = timeout_seconds(args)
    name = getattr(args, "tls_server_name", "")
    channel = Channel(
        host,
        port,
        ssl=client_tls(args),
        config=Configuration(ssl_target_name_override=name) if name else None,
    )
    try:
        yield Connection(channel, timeout, auth_metadata(args), reconnect_flags(args, os.environ))
    finally:
        channel.close()
