"""The database's keys: the URL (one host or a libpq host list) and how
connections notice a failover (the ``database:`` section)."""

from __future__ import annotations

import urllib.parse
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator

from vmpool.core.durations import parse_duration
from vmpool.core.echo import echo


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f'{value!r} is not a duration string such as "5s"')
    return parse_duration(value)


Duration = Annotated[timedelta, BeforeValidator(_duration)]


# Session attributes libpq and asyncpg know; vmpool writes, so only those that
# pick a writable server (or do not choose) make sense.
WRITABLE_SESSION_ATTRS = ("read-write", "primary", "any")
READ_ONLY_SESSION_ATTRS = ("read-only", "standby", "prefer-standby")


def _check_port(port: str) -> None:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")


def database_hosts(url: str) -> list[tuple[str, int | None]]:
    """The (host, port) pairs of a PostgreSQL URL's host list, in order
    (``postgresql://u@h1:5432,h2:5433/db``, as libpq and asyncpg read it); a
    host of None comes from ``?host=`` (e.g. a Unix socket). ValueError names
    what is wrong, never the password."""
    netloc = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0]
    hostlist = netloc.rpartition("@")[2]
    out: list[tuple[str, int | None]] = []
    for spec in hostlist.split(",") if hostlist else []:
        if spec.startswith("["):  # [IPv6]:port
            host, bracket, rest = spec[1:].partition("]")
            if not bracket or not host or (rest and not rest.startswith(":")):
                raise ValueError(f"host {len(out) + 1} of the host list is not [IPv6]:port")
            port = rest[1:]
        else:
            host, _, port = spec.partition(":")
        if not host:
            raise ValueError(f"host {len(out) + 1} of the host list is empty")
        if port:
            _check_port(port)
        out.append((urllib.parse.unquote(host), int(port) if port else None))
    return out


def check_database_url(url: str) -> str:
    """A PostgreSQL URL asyncpg can use, or ValueError saying what is wrong: a
    typo is a configuration mistake now, not a minute of "unreachable" later.
    Several hosts (``h1:5432,h2:5432``) with ``target_session_attrs`` are how a
    client finds the primary of a replicated cluster (docs/operations.md)."""
    if not url:
        return url
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql://user:password@host:port/database URL")
    hosts = database_hosts(url)
    query = urllib.parse.parse_qs(url.partition("?")[2], keep_blank_values=True)
    for port in query.get("port", []):
        for one in port.split(","):
            _check_port(one)
    if not hosts and "host" not in query:
        raise ValueError("names no host (postgresql://user@host:5432/database)")
    for attrs in query.get("target_session_attrs", []):
        if attrs in READ_ONLY_SESSION_ATTRS:
            raise ValueError(
                f"target_session_attrs={attrs} picks a read-only server; vmpool writes:"
                " use read-write (or primary)"
            )
        if attrs not in WRITABLE_SESSION_ATTRS:
            raise ValueError(
                "target_session_attrs must be one of "
                + ", ".join(WRITABLE_SESSION_ATTRS)
                + f" (not {echo(attrs, 32)!r})"
            )
    return url


def _true_false_or_warn(value: Any) -> bool | str:
    if value is True or value is False or value == "warn":
        return value  # type: ignore[no-any-return]
    raise ValueError("must be true, false or warn")


class DatabaseConfig(BaseModel):
    """How the connections to PostgreSQL notice a dead or switched server
    (docs/operations.md, "PostgreSQL high availability")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # One connection attempt, per host of the URL's host list: a host that
    # accepts TCP but never answers does not keep the next one from being tried.
    connect_timeout: Duration = timedelta(seconds=5)
    # A statement without an answer this long fails (UNAVAILABLE) and its
    # connection is dropped: no call waits on a stalled server past this.
    command_timeout: Duration = timedelta(seconds=5)
    # TCP keepalives and TCP_USER_TIMEOUT: a server gone at the network level
    # (machine lost, cable cut) is noticed within about this long, even on an
    # idle connection (LISTEN). "0s" leaves the kernel's defaults (hours).
    keepalive: Duration = timedelta(seconds=10)
    # At start, whether the server has a synchronous standby (without one, a
    # failover can lose acknowledged leases): false (do not check), "warn"
    # (log a warning), true (refuse to start).
    require_synchronous_standby: Annotated[
        bool | Literal["warn"], BeforeValidator(_true_false_or_warn)
    ] = False

    @field_validator("connect_timeout", "command_timeout")
    @classmethod
    def _timeout(cls, value: timedelta) -> timedelta:
        if not timedelta(milliseconds=100) <= value <= timedelta(minutes=10):
            raise ValueError("must be from 100ms to 10m")
        return value

    @field_validator("keepalive")
    @classmethod
    def _keepalive(cls, value: timedelta) -> timedelta:
        if value != timedelta(0) and not timedelta(seconds=2) <= value <= timedelta(hours=2):
            raise ValueError("must be 0s (off) or from 2s to 2h")
        return value
