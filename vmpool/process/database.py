"""The database pool of a server process, whatever its role: opened migrated
and checked (Database.close is bounded)."""

from __future__ import annotations

from typing import Any

from vmpool.config.schema import Config
from vmpool.control.background import SettingNotMet, StartupError
from vmpool.control.dbwatch import SynchronousStandbyMissing, check_synchronous_standby
from vmpool.store.connect import ConnectSettings
from vmpool.store.db import Database, connect, migrate
from vmpool.store.errors import StoreUnavailable


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
        await db.close()
        raise SettingNotMet(str(err)) from None
    except BaseException:
        await db.close()
        raise
    return db
