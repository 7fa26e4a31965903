"""The reconciler's and the admin view's queries over instances, queues and pools."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from vmpool.store import control_sql, events, inventory_sql, pools_sql
from vmpool.store.db import Database
from vmpool.store.errors import NotLeader, retrying, translated
from vmpool.store.records import EndedLease, LeaseRow

INSTANCE_STATES = ("provisioning", "ready", "reserved", "leased", "destroying")


@dataclass
class PoolSummary:
    name: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INSTANCE_STATES, 0))
    by_hash: dict[tuple[str, str], int] = field(default_factory=dict)  # (state, spec_hash) -> n
    oldest_provisioning: datetime | None = None
    oldest_ready: datetime | None = None
    waiting: int = 0  # queued with nothing set aside
    set_aside: int = 0
    oldest_enqueued: datetime | None = None
    next_reservation_expiry: datetime | None = None
    configured: bool = False
    drained: bool = False  # desired status not RUNNING: no leases, no free instances
    desired_status: str = "RUNNING"
    reached_running: bool = True  # min_ready reached since created or resumed

    @property
    def queued(self) -> int:
        return self.waiting + self.set_aside

    @property
    def total(self) -> int:
        """Instances that count against max_size (all but destroying)."""
        return sum(n for s, n in self.counts.items() if s != "destroying")


@dataclass
class Summary:
    pools: dict[str, PoolSummary]
    next_lease_expiry: datetime | None
    complete: bool = True  # every pool, or only some

    def pool(self, name: str) -> PoolSummary:
        return self.pools.setdefault(name, PoolSummary(name))


@dataclass(frozen=True, slots=True)
class InstanceRow:
    name: str
    pool: str
    state: str
    created_at: datetime
    destroy_reason: str | None
    spec_hash: str = ""


def _min(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


#: The fence of a leader's writes: (holder, term) while it leads, else None.
Fence = Callable[[], tuple[str, int] | None]

NOT_LEADER = "not the leader (a newer term began): write refused"

#: Each fenced statement's text, built once.
_fenced = functools.cache(control_sql.with_fence)


async def _refused_if_not_leader(rows: Awaitable[list[asyncpg.Record]]) -> list[asyncpg.Record]:
    """The rows of a write that carries the fence; NotLeader if the fence refused it."""
    try:
        return await rows
    except asyncpg.PostgresError as err:
        if getattr(err, "sqlstate", None) == control_sql.NOT_LEADER_STATE:
            raise NotLeader(NOT_LEADER) from None
        raise


class Inventory:
    """With ``fence`` (the reconciler's), every write is one transaction whose
    first statement checks, and share-locks, the leader row of this holder and
    term: once another process has taken over, the write raises NotLeader and
    changes nothing. Without it (the admin API), writes are not fenced."""

    def __init__(self, pool: Database, fence: Fence | None = None) -> None:
        self._pool = pool
        self._fence = fence

    async def _write(
        self,
        statements: Sequence[tuple[str, tuple[Any, ...]]],
        *,
        idempotent: bool = True,
        fence_in_last: bool = False,
    ) -> list[asyncpg.Record]:
        """Run ``statements`` in one fenced transaction; the last one's rows.
        With ``fence_in_last`` the last statement carries the fence itself
        (control_sql.with_fence: it must return every row it changes and have
        no WITH that modifies data), and a single statement runs alone, in
        autocommit: one round trip instead of four. Retried after deadlocks and
        serialization failures, and, if ``idempotent``, after a lost connection."""
        *first, (last, last_args) = statements

        async def once() -> list[asyncpg.Record]:
            token = self._token()
            query, args = last, last_args
            if fence_in_last and token is not None:
                query, args = _fenced(last), (*last_args, *token)
            async with self._pool.acquire() as conn:
                if not first and (fence_in_last or token is None):
                    rows: list[asyncpg.Record] = await _refused_if_not_leader(
                        conn.fetch(query, *args)
                    )
                    return rows
                async with conn.transaction():
                    if token is not None and not fence_in_last:
                        await self._check_fence(conn, token)
                    for stmt, stmt_args in first:
                        await conn.fetch(stmt, *stmt_args)
                    return await _refused_if_not_leader(conn.fetch(query, *args))

        async with translated():
            return await retrying(once, lost_connections=idempotent)

    async def fenced(self, statements: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        """Another store's statements in one fenced transaction (the leader's
        writes outside the instance tables, e.g. vmpool.store.autoscale)."""
        await self._write(statements)

    async def sync_pools(self, pools: Sequence[tuple[str, dict[str, str]]]) -> None:
        async with translated():
            await self._pool.execute(
                pools_sql.SYNC_POOLS, [p[0] for p in pools], [p[1] for p in pools]
            )

    async def summary(self, pools: Sequence[str] | None = None) -> Summary:
        """Counts of every pool, or of ``pools`` only (``complete`` says which)."""
        async with translated():
            if pools is None:
                rows = await self._pool.fetch(inventory_sql.SUMMARY)
            else:
                rows = await self._pool.fetch(inventory_sql.SUMMARY_OF, list(pools))
        out = Summary(pools={}, next_lease_expiry=None, complete=pools is None)
        for r in rows:
            kind = r["kind"]
            if kind == "leases":
                out.next_lease_expiry = r["due"]
                continue
            p = out.pool(r["pool"])
            if kind == "instances":
                p.counts[r["state"]] += int(r["n"])
                p.by_hash[(r["state"], r["spec_hash"])] = int(r["n"])
                if r["state"] == "provisioning":
                    p.oldest_provisioning = _min(p.oldest_provisioning, r["oldest_created"])
                elif r["state"] == "ready":
                    p.oldest_ready = _min(p.oldest_ready, r["oldest_ready"])
            elif kind == "queue":
                p.next_reservation_expiry = _min(p.next_reservation_expiry, r["due"])
                if r["state"] == "served":
                    continue  # served at once; kept only until cleaned up
                if r["state"] == "waiting":
                    p.waiting = int(r["n"])
                else:
                    p.set_aside = int(r["n"])
                p.oldest_enqueued = _min(p.oldest_enqueued, r["oldest_created"])
            elif kind == "pools":
                p.configured = bool(r["n"] & 1)
                p.reached_running = bool(r["n"] & 2)
                p.desired_status = r["state"]
                p.drained = r["state"] != "RUNNING"
        return out

    async def expire_leases(self, now: datetime) -> list[EndedLease]:
        rows = await self._write([(inventory_sql.EXPIRE_LEASES, (now,))])
        return [
            EndedLease(r["instance"], r["pool"], r["service_tag"], r["leased_at"], r["principal"])
            for r in rows
        ]

    async def expire_reservations(
        self, now: datetime, pools: tuple[str, ...] | None = None
    ) -> list[tuple[str, str, str | None]]:
        """Drop expired queue entries (and spent served-at-once ones) of these
        pools (None: of all); the expired."""
        if pools is None:
            rows = await self._write([(inventory_sql.EXPIRE_RESERVATIONS, (now,))])
        else:
            rows = await self._write([(inventory_sql.EXPIRE_RESERVATIONS_OF, (now, list(pools)))])
        return [(str(r["id"]), r["pool"], r["instance"]) for r in rows if not r["served"]]

    async def set_aside(self, pool: str, now: datetime, limit: int) -> list[tuple[str, str]]:
        """Pair free instances with waiting reservations, oldest first: [(reservation, instance)]."""
        out: list[tuple[str, str]] = []
        for _ in range(limit):
            rows = await self._write([(inventory_sql.SET_ASIDE, (pool, now))])
            if not rows:
                break
            out.append((str(rows[0]["id"]), rows[0]["instance"]))
        return out

    async def add_instances(
        self, pool: str, names: list[str], now: datetime, spec_hash: str, max_size: int
    ) -> list[str]:
        """Write rows for ``names`` (made from ``spec_hash``); those written, which
        are fewer if the pool would exceed ``max_size`` rows that are not destroying."""
        rows = await self._write(
            [(inventory_sql.ADD_INSTANCES, (names, pool, now, spec_hash, max_size))],
            idempotent=False,  # committed before the connection broke? Not known: no retry
            fence_in_last=True,
        )
        return [r["name"] for r in rows]

    async def stale_of_pool(self, pool: str, spec_hash: str, state: str, limit: int) -> list[str]:
        """Up to ``limit`` instances of ``pool`` in ``state`` not made from ``spec_hash``."""
        async with translated():
            rows = await self._pool.fetch(
                inventory_sql.STALE_OF_POOL, pool, spec_hash, state, limit
            )
        return [r["name"] for r in rows]

    async def work_rows(self, *, everything: bool = False) -> list[InstanceRow]:
        async with translated():
            rows = await self._pool.fetch(
                inventory_sql.ALL_ROWS if everything else inventory_sql.WORK_ROWS
            )
        return [InstanceRow(*r) for r in rows]

    async def rows_named(self, names: list[str]) -> list[InstanceRow]:
        async with translated():
            rows = await self._pool.fetch(inventory_sql.ROWS_NAMED, names)
        return [InstanceRow(*r) for r in rows]

    async def mark_ready(
        self, ready: Iterable[tuple[str, str]], now: datetime
    ) -> list[tuple[str, str, datetime]]:
        pairs = list(ready)
        rows = await self._write(
            [(inventory_sql.MARK_READY, ([n for n, _ in pairs], [z for _, z in pairs], now))],
            fence_in_last=True,
        )
        return [(r["name"], r["pool"], r["created_at"]) for r in rows]

    async def mark_destroying(
        self, names: list[str], reason: str, now: datetime, from_states: Sequence[str]
    ) -> list[str]:
        rows = await self._write(
            [(inventory_sql.MARK_DESTROYING, (names, reason, now, list(from_states)))],
            fence_in_last=True,
        )
        return [r["name"] for r in rows]

    async def ready_older_than(self, pool: str, cutoff: datetime) -> list[str]:
        async with translated():
            return [
                r["name"]
                for r in await self._pool.fetch(inventory_sql.READY_OLDER_THAN, pool, cutoff)
            ]

    async def free_of_pool(self, pool: str) -> list[str]:
        async with translated():
            return [r["name"] for r in await self._pool.fetch(inventory_sql.FREE_OF_POOL, pool)]

    async def drop_queue(self, pool: str, now: datetime) -> None:
        await self._write([(inventory_sql.DROP_QUEUE, (pool, now))])

    async def forget(self, names: list[str]) -> None:
        await self._write([(inventory_sql.FORGET, (names,))], fence_in_last=True)

    async def vanished(
        self, names: list[str], now: datetime
    ) -> list[tuple[str, str, str, str, str | None]]:
        """[(name, pool, state, service_tag or '', the lease's principal or None)] for
        rows whose VM disappeared (a principal only where a lease ended)."""
        rows = await self._write([(inventory_sql.VANISHED, (names, now))])
        return [
            (r["name"], r["pool"], r["state"], r["service_tag"] or "", r["principal"]) for r in rows
        ]

    async def prune_history(self, before: datetime, batch: int) -> int:
        """Delete one batch of lease_history ended before ``before``; how many."""
        async with translated():
            status = await self._write_status(inventory_sql.PRUNE_HISTORY, (before, batch))
        return int(status.rsplit(" ", 1)[-1])

    async def prune_events(self, older_than: timedelta, batch: int) -> int:
        """Delete one batch of lease events older than ``older_than``; how many."""
        return await events.prune(self._pool, older_than, batch)

    async def mark_reached_running(self, pools: Sequence[str]) -> None:
        """These pools reached min_ready: INITIALIZING becomes RUNNING (pool-api.md)."""
        await self._write([(pools_sql.MARK_REACHED_RUNNING, (list(pools),))])

    async def forget_deleted_pools(self) -> list[str]:
        """Deleted API pools with no instance left disappear; their names are free."""
        return [r["name"] for r in await self._write([(pools_sql.FORGET_DELETED_POOLS, ())])]

    async def _write_status(self, query: str, args: tuple[Any, ...]) -> str:
        async def once() -> str:
            token = self._token()
            async with self._pool.acquire() as conn, conn.transaction():
                if token is not None:
                    await self._check_fence(conn, token)
                status: str = await conn.execute(query, *args)
                return status

        return await retrying(once, lost_connections=True)

    def _token(self) -> tuple[str, int] | None:
        """The fence's (holder, term); None without a fence; NotLeader when not leading."""
        if self._fence is None:
            return None
        token = self._fence()
        if token is None:
            raise NotLeader(NOT_LEADER)
        return token

    async def _check_fence(self, conn: asyncpg.Connection, token: tuple[str, int]) -> None:
        if await conn.fetchval(control_sql.LEADER_FENCE, *token) is None:
            raise NotLeader(NOT_LEADER)

    async def list_leases(self, pool: str) -> list[LeaseRow]:
        async with translated():
            return [LeaseRow.of(r) for r in await self._pool.fetch(inventory_sql.LIST_LEASES, pool)]

    async def list_reservations(self, pool: str) -> list[dict[str, Any]]:
        async with translated():
            return [dict(r) for r in await self._pool.fetch(inventory_sql.LIST_RESERVATIONS, pool)]
