"""API pools and every pool's desired status (VMPoolService's view of the pools table)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from vmpool.store import pools_sql
from vmpool.store.db import Database
from vmpool.store.errors import translated


@dataclass(frozen=True, slots=True)
class PoolRow:
    name: str
    source: str  # config | api
    configured: bool
    desired_status: str
    reached_running: bool
    runtime: str
    intrinsic_os: str
    hardware_template: str
    pool_tier: str
    owner: str
    created_at: datetime
    updated_at: datetime
    # Instances by state (only from the counting queries; else zero).
    provisioning: int = 0
    ready: int = 0
    reserved: int = 0
    leased: int = 0
    destroying: int = 0
    free_hashes: tuple[str, ...] = ()  # spec hash of each free (ready, provisioning) one

    @classmethod
    def of(cls, row: Any) -> PoolRow:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in dict(row).items() if k in names}
        if "free_hashes" in values:
            values["free_hashes"] = tuple(values["free_hashes"])
        return cls(**values)

    @property
    def is_api(self) -> bool:
        return self.source == "api"


@dataclass(frozen=True, slots=True)
class SpecRow:
    name: str
    runtime: str
    intrinsic_os: str
    hardware_template: str
    pool_tier: str


@dataclass(frozen=True, slots=True)
class SetSpec:
    """A pool's new spec (UpdatePool)."""

    runtime: str
    intrinsic_os: str
    hardware_template: str
    pool_tier: str
    at: datetime


@dataclass(frozen=True, slots=True)
class SetDesiredStatus:
    """Delete, stop, pause or resume a pool."""

    status: str
    at: datetime


PoolWrite = SetSpec | SetDesiredStatus


class PoolStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def list_with_counts(self, name: str | None = None) -> list[PoolRow]:
        async with translated():
            rows = await self._db.fetch(pools_sql.POOLS_WITH_COUNTS, name)
        return [PoolRow.of(r) for r in rows]

    async def get(self, name: str) -> PoolRow | None:
        async with translated():
            row = await self._db.fetchrow(pools_sql.POOL_ROW, name)
        return PoolRow.of(row) if row else None

    async def api_specs(self, *, exclude_deleted: bool = False) -> list[SpecRow]:
        async with translated():
            rows = await self._db.fetch(
                pools_sql.API_POOL_SPECS_LISTED if exclude_deleted else pools_sql.API_POOL_SPECS
            )
        return [SpecRow(*r) for r in rows]

    async def create(
        self,
        name: str,
        runtime: str,
        intrinsic_os: str,
        hardware_template: str,
        pool_tier: str,
        owner: str,
        now: datetime,
    ) -> bool:
        """False when the name is taken."""
        async with translated():
            row = await self._db.fetchrow(
                pools_sql.CREATE_API_POOL,
                name,
                runtime,
                intrinsic_os,
                hardware_template,
                pool_tier,
                owner,
                now,
            )
        return row is not None

    async def change(
        self, name: str, decide: Callable[[PoolRow], PoolWrite | None]
    ) -> PoolRow | None:
        """Lock the pool's row, let ``decide`` pick a write (or None for none),
        apply it; one transaction. None when there is no such pool."""
        async with translated(), self._db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(pools_sql.LOCK_API_POOL_ROW, name)
            if row is None:
                return None
            current = PoolRow.of(row)
            write = decide(current)
            match write:
                case SetSpec():
                    await conn.execute(
                        pools_sql.SET_POOL_SPEC,
                        name,
                        write.runtime,
                        write.intrinsic_os,
                        write.hardware_template,
                        write.pool_tier,
                        write.at,
                    )
                case SetDesiredStatus():
                    await conn.execute(pools_sql.SET_DESIRED_STATUS, name, write.status, write.at)
            return current

    async def api_names_among(self, names: Sequence[str]) -> list[str]:
        async with translated():
            return [r["name"] for r in await self._db.fetch(pools_sql.API_POOLS_NAMED, list(names))]
