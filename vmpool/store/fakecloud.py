"""Storage for the fake provider's simulated VMs (they outlive a server crash)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from vmpool.store import sql
from vmpool.store.errors import translated


class FakeCloud:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self, name: str, pool: str, now: datetime, ready_at: datetime, fails: bool, zone: str
    ) -> None:
        async with translated():
            await self._pool.execute(sql.FAKE_CREATE, name, pool, now, ready_at, fails, zone)

    async def delete(self, name: str) -> None:
        async with translated():
            await self._pool.execute(sql.FAKE_DELETE, name)

    async def list(self) -> list[dict[str, Any]]:
        async with translated():
            return [dict(r) for r in await self._pool.fetch(sql.FAKE_LIST)]
