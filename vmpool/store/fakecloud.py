"""Storage for the fake provider's simulated VMs (they outlive a server crash)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from vmpool.store import sql
from vmpool.store.db import Database
from vmpool.store.errors import translated


@dataclass(frozen=True, slots=True)
class FakeVM:
    name: str
    pool: str
    created_at: datetime
    ready_at: datetime
    fails: bool
    zone: str


class FakeCloud:
    def __init__(self, pool: Database) -> None:
        self._pool = pool

    async def create_many(self, vms: list[FakeVM]) -> list[None]:
        """Create VMs; one that exists already is left as it is (idempotent by name)."""
        async with translated():
            await self._pool.execute(
                sql.FAKE_CREATE,
                [v.name for v in vms],
                [v.pool for v in vms],
                [v.created_at for v in vms],
                [v.ready_at for v in vms],
                [v.fails for v in vms],
                [v.zone for v in vms],
            )
        return [None] * len(vms)

    async def delete_many(self, names: list[str]) -> list[None]:
        async with translated():
            await self._pool.execute(sql.FAKE_DELETE, names)
        return [None] * len(names)

    async def list(self) -> list[FakeVM]:
        async with translated():
            return [FakeVM(*r) for r in await self._pool.fetch(sql.FAKE_LIST)]

    async def get(self, name: str) -> FakeVM | None:
        async with translated():
            row = await self._pool.fetchrow(sql.FAKE_GET, name)
        return FakeVM(*row) if row else None
