"""Listening on the ports a server process serves (gRPC, metrics); a port
that is taken is named in one line (AddressInUse: exit 2)."""

from __future__ import annotations

import errno
from typing import Any

from vmpool.config.schema import Config
from vmpool.control.background import StartupError
from vmpool.core.address import split_host_port
from vmpool.ops.metrics import Metrics
from vmpool.ops.metrics_http import start_metrics_server
from vmpool.wire.h2guard import GuardedServer


class AddressInUse(StartupError):
    """A port to listen on is taken (exit 2, one line naming the address)."""


def start_metrics(config: Config, metrics: Metrics) -> None:
    if not config.metrics_listen:
        return
    host, port = split_host_port(config.metrics_listen, "0.0.0.0")
    try:
        start_metrics_server(host, port, metrics.registry)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise AddressInUse(f"metrics_listen {host}:{port}: address already in use") from None
        raise StartupError(f"metrics_listen {host}:{port}: {err.strerror or err}") from None


async def listen_on(
    server: GuardedServer,
    what: str,
    address: str,
    *,
    reuse_port: bool,
    ssl: Any = None,
) -> tuple[str, int]:
    """Start ``server`` on ``address``; a busy port is AddressInUse naming it.
    ``reuse_port`` (``--reuse-port``): share the port with other processes
    (SO_REUSEPORT), as the benchmark's two-process mode does; off, a second
    server on the same port is refused instead of silently sharing it."""
    host, port = split_host_port(address, "0.0.0.0")
    try:
        await server.start(host, port, reuse_port=reuse_port, ssl=ssl)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise AddressInUse(f"{what} {host}:{port}: address already in use") from None
        raise StartupError(f"{what} {host}:{port}: {err.strerror or err}") from None
    return host, port
