"""Storage for the fake provider's simulated VMs (they outlive a server crash)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from vmpool.store.db import Database
from vmpool.store.errors import translated

FAKE_CREATE = """
INSERT INTO fake_vms (name, pool, created_at, ready_at, fails, zone)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                     $5::boolean[], $6::text[])
ON CONFLICT (name) DO NOTHING
"""
FAKE_DELETE = "DELETE FROM fake_vms WHERE name = ANY ($1::text[])"
FAKE_LIST = "SELECT name, pool, created_at, ready_at, fails, zone FROM fake_vms"
FAKE_GET = FAKE_LIST + " WHERE name = $1"


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
                FAKE_CREATE,
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
            await self._pool.execute(FAKE_DELETE, names)
        return [None] * len(names)

    async def list(self) -> list[FakeVM]:
        async with translated():
            return [FakeVM(*r) for r in await self._pool.fetch(FAKE_LIST)]

    async def get(self, name: str) -> FakeVM | None:
        async with translated():
            row = await self._pool.fetchrow(FAKE_GET, name)
        return FakeVM(*row) if row else None
