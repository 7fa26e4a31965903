"""The database URL and keys a failover needs: several hosts with
target_session_attrs accepted; a malformed list, a bad port or a read-only
target refused at start with one line naming the key and no password; the
pure helpers the connection code uses."""

from __future__ import annotations

import socket
from pathlib import Path

import asyncpg
import pytest

from tests.unit.config.test_config_errors import one_line_each, run
from vmpool.config.database import database_hosts
from vmpool.config.loading import ConfigError, parse_config
from vmpool.store.connect import _addresses, keepalive_options
from vmpool.store.errors import StoreReadOnly, StoreUnavailable, read_only, unavailable
from vmpool.store.replication import SyncState, TimelineWatch

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        (
            f"postgresql://vmpool:{SECRET}@h1:5432,h2:5433/vmpool?target_session_attrs=read-write",
            [("h1", 5432), ("h2", 5433)],
        ),
        (f"postgresql://vmpool:{SECRET}@h1,h2/vmpool", [("h1", None), ("h2", None)]),
        ("postgresql://u@[::1]:5432,[fe80::1]/db", [("::1", 5432), ("fe80::1", None)]),
        ("postgres://u@db.example:5432/db?target_session_attrs=primary", [("db.example", 5432)]),
        ("postgresql://u@/db?host=/run/postgresql", []),
    ],
)
def test_several_hosts_are_a_valid_database_url(url: str, hosts: list[tuple[str, int]]) -> None:
    assert parse_config({"database_url": url}).database_url == url
    assert database_hosts(url) == hosts


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"postgresql://u:{SECRET}@h1:5432,h2:54x/db", "the port must be a number"),
        (f"postgresql://u:{SECRET}@h1:5432,,h2/db", "host 2 of the host list is empty"),
        (f"postgresql://u:{SECRET}@h1:0,h2/db", "the port must be a number"),
        (f"postgresql://u:{SECRET}@[::1/db", "is not [IPv6]:port"),
        (f"postgresql://u:{SECRET}@h1,h2/db?target_session_attrs=rw", "must be one of read-write"),
        (f"postgresql://u:{SECRET}@h1,h2/db?target_session_attrs=standby", "picks a read-only"),
        (f"postgresql://u:{SECRET}@h1/db?target_session_attrs=read-only", "picks a read-only"),
    ],
)
def test_a_malformed_multi_host_url_names_the_key_not_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"database_url": url})
    message = str(err.value)
    assert message.startswith("config: database_url: "), message
    assert says in message
    assert SECRET not in message


def test_vmpool_serve_refuses_a_bad_target_session_attrs_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    url = f"postgresql://vmpool:{SECRET}@h1:5432,h2:5432/vmpool?target_session_attrs=standby"
    path.write_text(f"database_url: '{url}'\n")
    done = run("serve", "--config", str(path))
    assert done.returncode == 2, done
    (line,) = one_line_each(done.stderr)
    assert f"{path}: database_url: target_session_attrs=standby" in line, line
    assert SECRET not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"keepalive": "1s"}, "database.keepalive"),
        ({"command_timeout": "0s"}, "database.command_timeout"),
        ({"connect_timeout": "1h"}, "database.connect_timeout"),
        ({"require_synchronous_standby": "maybe"}, "database.require_synchronous_standby"),
        ({"statement_timeout": "5s"}, "database.statement_timeout"),
    ],
)
def test_bad_database_keys_name_the_key(data: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"database": data})
    assert str(err.value).startswith(f"config: {key}: "), str(err.value)


def test_require_synchronous_standby_takes_true_false_or_warn() -> None:
    for value in (True, False, "warn"):
        db = parse_config({"database": {"require_synchronous_standby": value}}).database
        assert db.require_synchronous_standby == value


def test_each_host_is_tried_in_turn_only_for_a_host_list() -> None:
    assert _addresses("postgresql://u@h1:1,h2:2/db") == [("h1", 1), ("h2", 2)]
    assert _addresses("postgresql://u@h1:1/db") == []  # asyncpg reads it itself
    assert _addresses("postgresql://u@/db?host=/tmp&port=5432") == []


def test_keepalive_options_bound_the_time_to_notice_a_dead_peer() -> None:
    options = {(level, opt): value for level, opt, value in keepalive_options(12)}
    assert options[(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] == 1
    tcp = socket.IPPROTO_TCP
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        assert options[(tcp, socket.TCP_USER_TIMEOUT)] == 12_000
    if hasattr(socket, "TCP_KEEPIDLE"):
        idle = options[(tcp, socket.TCP_KEEPIDLE)]
        interval = options[(tcp, socket.TCP_KEEPINTVL)]
        count = options[(tcp, socket.TCP_KEEPCNT)]
        assert idle + interval * count <= 12
    assert keepalive_options(0) == []


def test_a_read_only_session_is_unavailable_not_an_error_of_its_own() -> None:
    standby = asyncpg.exceptions.ReadOnlySQLTransactionError(
        "cannot execute LISTEN during recovery"
    )
    wal = asyncpg.exceptions.ObjectNotInPrerequisiteStateError("recovery is in progress")
    no_match = asyncpg.exceptions.TargetServerAttributeNotMatched("none of the hosts")
    for err in (standby, wal, no_match):
        assert read_only(err) and unavailable(err)
    translated = StoreReadOnly("database read-only")
    translated.__cause__ = standby
    assert read_only(translated) and isinstance(translated, StoreUnavailable)
    other = asyncpg.exceptions.ObjectNotInPrerequisiteStateError("something else")
    assert not read_only(other) and not unavailable(other)
    assert not read_only(asyncpg.exceptions.UniqueViolationError("dup"))


def test_a_timeline_change_is_noticed_once() -> None:
    watch = TimelineWatch()
    assert watch.observe(1) is False  # the first look is no change
    assert watch.observe(1) is False
    assert watch.observe(2) is True
    assert watch.observe(2) is False
    assert watch.current == 2


@pytest.mark.parametrize(
    ("names", "commit", "synchronous"),
    [
        ("", "on", False),
        ("FIRST 1 (standby1)", "on", True),
        ("ANY 1 (a, b)", "remote_apply", True),
        ("standby1", "local", False),
        ("standby1", "off", False),
    ],
)
def test_synchronous_means_a_named_standby_and_a_waiting_commit(
    names: str, commit: str, synchronous: bool
) -> None:
    state = SyncState(names, commit, 0)
    assert state.synchronous is synchronous
    assert state.describe()
