"""Opening one PostgreSQL connection so that a failover is noticed in bounded time.

Every connection vmpool makes (the pool's, the control connection, Ping's, the
WatchLeases event reader's) goes through ``open_connection``:

- Each host of the URL's host list (``h1:5432,h2:5432``) is tried in turn with
  its own ``connect_timeout``, as libpq does; asyncpg's own ``timeout`` covers
  the whole list, so a first host that accepts TCP but never answers (a stalled
  old primary) would use it all and the second host would never be tried.
  ``target_session_attrs`` is checked per host by asyncpg.
- A session on a server that refuses writes (a standby in recovery, as when
  a `-rw` address reaches it before its promotion, or a database with
  ``default_transaction_read_only``) is closed at once and the next host tried,
  as ``target_session_attrs=read-write`` does, whatever the URL says: vmpool
  writes. It costs no round trip (the server reports both settings).
- TCP keepalives and TCP_USER_TIMEOUT on the socket: a server lost at the
  network level is noticed on an idle connection (LISTEN) and on one waiting
  for an answer, within about ``keepalive`` seconds, not after the kernel's
  two hours. (libpq's ``keepalives_*`` URL parameters are not read by asyncpg.)
"""

from __future__ import annotations

import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from vmpool.config.database import DatabaseConfig, database_hosts

log = structlog.get_logger("vmpool.store")


@dataclass(frozen=True)
class ConnectSettings:
    connect_timeout: float = 5.0
    command_timeout: float = 5.0
    keepalive: float = 10.0  # 0: the kernel's defaults

    @classmethod
    def from_config(cls, config: DatabaseConfig) -> ConnectSettings:
        return cls(
            config.connect_timeout.total_seconds(),
            config.command_timeout.total_seconds(),
            config.keepalive.total_seconds(),
        )


def keepalive_options(seconds: float) -> list[tuple[int, int, int]]:
    """(level, option, value) for a dead peer noticed within about ``seconds``:
    idle probes start after half of it, three probes a sixth apart; data left
    unacknowledged for ``seconds`` ends the connection (TCP_USER_TIMEOUT)."""
    if seconds <= 0:
        return []
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    tcp = socket.IPPROTO_TCP
    for name, value in (
        ("TCP_KEEPIDLE", max(1, int(seconds / 2))),
        ("TCP_KEEPINTVL", max(1, int(seconds / 6))),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(seconds * 1000)),
    ):
        if hasattr(socket, name):  # Linux has all; others some
            options.append((tcp, getattr(socket, name), value))
    return options


def set_keepalive(conn: asyncpg.Connection, seconds: float) -> None:
    transport = getattr(conn, "_transport", None)  # asyncpg keeps it there
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket: the server's machine is ours
    for level, option, value in keepalive_options(seconds):
        sock.setsockopt(level, option, value)


def refuses_writes(conn: asyncpg.Connection) -> bool:
    """What the server reported at start-up (PostgreSQL 14+; older ones say
    nothing here and are caught at the first write: 25006)."""
    settings = conn.get_settings()
    return (
        getattr(settings, "in_hot_standby", "off") == "on"
        or getattr(settings, "default_transaction_read_only", "off") == "on"
    )


def _addresses(url: str) -> list[tuple[str, int | None]]:
    """The host list, or [] when asyncpg should read it all from the URL
    (``?host=`` sockets, a single host)."""
    hosts = database_hosts(url)
    query = urllib.parse.parse_qs(url.partition("?")[2])
    return hosts if len(hosts) > 1 and "host" not in query and "port" not in query else []


async def open_connection(
    url: str, settings: ConnectSettings, *, application_name: str, **kwargs: Any
) -> asyncpg.Connection:
    """One connection to the first host of ``url`` that answers and matches its
    ``target_session_attrs``; the last host's error if none does. ``kwargs``
    go to asyncpg.connect (the pool passes its connection class)."""
    kwargs.setdefault("command_timeout", settings.command_timeout)
    server_settings = {"application_name": application_name, **kwargs.pop("server_settings", {})}
    addresses: list[tuple[str | None, int | None]] = [*_addresses(url)] or [(None, None)]
    last: BaseException | None = None
    for host, port in addresses:
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                url,
                host=host,
                port=port,
                timeout=settings.connect_timeout,
                server_settings=server_settings,
                **kwargs,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            last = err
            continue
        except asyncpg.exceptions.InternalClientError as err:  # no target_session_attrs match
            last = err
            continue
        if refuses_writes(conn):
            conn.terminate()
            last = asyncpg.exceptions.TargetServerAttributeNotMatched(
                f"{host or 'the server'} is read-only (a standby in recovery?)"
            )
            continue
        try:
            set_keepalive(conn, settings.keepalive)
        except OSError as err:
            log.warning("TCP keepalive not set", error=str(err))
        return conn
    assert last is not None
    raise last
