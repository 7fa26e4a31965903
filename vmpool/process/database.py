"""The database pool of a server process, whatever its role: opened migrated
and checked, closed within a bound."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from vmpool.config.schema import Config
from vmpool.control.background import SettingNotMet, StartupError
from vmpool.control.dbwatch import SynchronousStandbyMissing, check_synchronous_standby
from vmpool.store.connect import ConnectSettings
from vmpool.store.db import Database, connect, migrate
from vmpool.store.errors import UNAVAILABLE_ERRORS, StoreUnavailable

log = structlog.get_logger("vmpool")


async def open_database(config: Config, url: str, **connect_args: Any) -> Database:
    """The database pool, migrated and checked (a synchronous standby where
    config.database requires one); StartupError when it cannot be used."""
    settings = ConnectSettings.from_config(config.database)
    try:
        db = await connect(url, settings=settings, **connect_args)
    except StoreUnavailable as err:
        raise StartupError(f"database_url: {err}") from None
    try:
        async with db.acquire() as conn:
            await migrate(conn)
        await check_synchronous_standby(db, config.database)
    except SynchronousStandbyMissing as err:
        await close_database(db)
        raise SettingNotMet(str(err)) from None
    except BaseException:
        await close_database(db)
        raise
    return db


async def close_database(db: Database) -> None:
    try:
        await asyncio.wait_for(db.close(), 5)
    except UNAVAILABLE_ERRORS as err:  # TimeoutError is among them
        log.warning("database pool did not close cleanly", error=repr(err))
        db.terminate()
