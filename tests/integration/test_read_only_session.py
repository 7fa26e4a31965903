"""A session that turns out read-only (a standby in recovery, or a database
with default_transaction_read_only, as here) is StoreReadOnly (UNAVAILABLE to
a client) and is dropped, not put back: once the server is writable again the
very next call works, on a new session."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from typing import TypeVar

import asyncpg
import pytest

from tests.pg import TestPostgres
from tests.polling import eventually
from vmpool.domain.watch import Scope
from vmpool.services.lease_events import EventHub, StreamEnded, WatchLimits
from vmpool.store.connect import ConnectSettings
from vmpool.store.control import Control
from vmpool.store.db import Database, create_pool
from vmpool.store.errors import StoreReadOnly, StoreUnavailable, translated
from vmpool.store.events import EventStore
from vmpool.store.probe import ProbeConnection

T = TypeVar("T")

WRITE = "INSERT INTO pools (name, labels, configured) VALUES ($1, '{}', true)"


async def set_read_only(postgres: TestPostgres, url: str, on: bool) -> None:
    """Switch the database for new sessions. Switching on also ends the open
    sessions (so the next ones are read-only, as after a failover to a
    standby); switching off does not: an open read-only session stays so."""
    name = urllib.parse.urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(postgres.url)
    try:
        if on:
            await admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        else:
            await admin.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
            return
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
    finally:
        await admin.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[tuple[Database, list[bool]]]:
    dropped: list[bool] = []
    database = await create_pool(db_url, min_size=1, max_size=1, on_dropped=dropped.append)
    yield database, dropped
    database.terminate()


async def write(db: Database, name: str) -> None:
    async with translated(), db.acquire() as conn:
        await conn.execute(WRITE, name)


async def test_a_session_that_turns_read_only_is_dropped_and_replaced(
    db: tuple[Database, list[bool]],
) -> None:
    database, dropped = db  # one connection: a kept session would be used again
    await write(database, "before")
    async with database.acquire() as conn:  # as a standby's session refuses writes
        await conn.execute("SET default_transaction_read_only = on")
    with pytest.raises(StoreReadOnly):
        await write(database, "during")
    assert dropped == [True]
    await write(database, "after")  # a new session
    names = {r["name"] for r in await database.fetch("SELECT name FROM pools")}
    assert {"before", "after"} <= names and "during" not in names


async def test_no_session_is_opened_on_a_read_only_server_and_writes_resume_without_restart(
    db: tuple[Database, list[bool]], db_url: str, postgres: TestPostgres
) -> None:
    """The database turns read-only (as when the URL's address reaches a standby
    in recovery): every call is StoreReadOnly, no session on it is kept; once it
    is writable again (promoted) the same pool writes."""
    database, _ = db
    await set_read_only(postgres, db_url, True)
    refusals = []
    for i in range(3):  # the first may meet the session the switch ended: lost
        with pytest.raises(StoreUnavailable) as err:
            await write(database, f"during-{i}")
        refusals.append(type(err.value))
    assert refusals[-2:] == [StoreReadOnly, StoreReadOnly]
    await set_read_only(postgres, db_url, False)
    await write(database, "after")
    names = {r["name"] for r in await database.fetch("SELECT name FROM pools")}
    assert "after" in names and not any(n.startswith("during") for n in names)


async def test_readiness_fails_on_a_read_only_server_and_recovers(
    db_url: str, postgres: TestPostgres
) -> None:
    dropped: list[bool] = []
    probe = ProbeConnection(db_url, on_dropped=dropped.append)
    try:
        await probe.ping(2)
        await set_read_only(postgres, db_url, True)
        with pytest.raises(StoreUnavailable):  # its session was ended by the switch
            await probe.ping(2)
        with pytest.raises(StoreReadOnly):  # and no new one is opened on a read-only server
            await probe.ping(2)
        assert dropped  # the ended session was let go
        await set_read_only(postgres, db_url, False)
        await probe.ping(2)
    finally:
        await probe.close()


async def run_control(control: Control) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(control.run(stop), name="control")


async def stop_control(control: Control, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, 10)
    await control.close()


async def test_a_read_only_control_session_is_retried_not_fatal(db_url: str) -> None:
    """The session turns read-only after it connected (as one on a standby):
    its leadership write fails with 25006. That ended the control loop, and
    the process with it ("stopped after a fatal error: control: ..."); now the
    session is dropped and made anew until one can write."""
    sessions: list[asyncpg.Connection] = []
    dropped: list[bool] = []

    async def turns_read_only(conn: asyncpg.Connection) -> None:
        sessions.append(conn)
        if len(sessions) <= 2:  # the first two sessions refuse writes
            await conn.execute("SET default_transaction_read_only = on")

    control = Control(
        db_url,
        0.1,
        lambda: None,
        lambda _: None,
        ttl=1.0,
        on_connected=turns_read_only,
        on_dropped=dropped.append,
    )
    stop, task = await run_control(control)
    try:
        await eventually(lambda: _now(control.is_leader()), bool, 15, "leader on the third session")
        assert not task.done()
        assert dropped == [True, True] and len(sessions) == 3
    finally:
        await stop_control(control, stop, task)


async def test_the_control_loop_waits_out_a_read_only_database(
    db_url: str, postgres: TestPostgres
) -> None:
    dropped: list[bool] = []
    control = Control(db_url, 0.1, lambda: None, lambda _: None, ttl=1.0, on_dropped=dropped.append)
    await set_read_only(postgres, db_url, True)
    stop, task = await run_control(control)
    try:
        await eventually(lambda: _now(len(dropped)), lambda n: n >= 2, 15, "sessions refused")
        assert set(dropped) == {True} and not control.is_leader() and not task.done()
        await set_read_only(postgres, db_url, False)
        await eventually(lambda: _now(control.is_leader()), bool, 15, "leader once writable")
    finally:
        await stop_control(control, stop, task)


async def _now(value: T) -> T:
    return value


async def test_watch_leases_is_not_served_from_a_read_only_server(
    postgres: TestPostgres, db_url: str, db: tuple[Database, list[bool]]
) -> None:
    """The event reader's own session refuses a read-only server as every other
    session does: a stream opened there would never see a new event. It starts
    once the server is writable again, without a restart."""
    database, _ = db
    hub = EventHub(
        db_url,
        EventStore(database),
        WatchLimits(),
        encode=lambda _e: b"",
        settings=ConnectSettings(connect_timeout=2),
    )
    await set_read_only(postgres, db_url, True)
    try:
        with pytest.raises(StreamEnded) as refused:
            await hub.open(Scope(), None, "peer")
        assert refused.value.code == "UNAVAILABLE"
        await set_read_only(postgres, db_url, False)
        deadline = asyncio.get_running_loop().time() + 60  # a bound, not a speed target
        while True:
            try:
                sub = await hub.open(Scope(), None, "peer")
                break
            except StreamEnded:
                assert asyncio.get_running_loop().time() < deadline, "never started"
        hub.close(sub)
    finally:
        await set_read_only(postgres, db_url, False)
        await hub.shutdown()
