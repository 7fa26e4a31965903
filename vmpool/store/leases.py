"""The RPC hot path: claims, reservations, returns and extensions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

import structlog

from vmpool.core.batching import MAX_BATCH, MicroBatcher
from vmpool.core.instant import Instant
from vmpool.store import leases_sql, probe
from vmpool.store.db import Database
from vmpool.store.errors import StoreError, StoreUnavailable, translated
from vmpool.store.records import (
    EndedLease,
    FirstUse,
    LeaseRow,
    Owner,
    Queued,
    ReservationState,
    expiry_columns,
    expiry_of,
    record_of,
)

log = structlog.get_logger("vmpool.store")


class NotLeased(Exception):
    """No active lease for the instance."""


class WrongTag(Exception):
    """The lease belongs to another service_tag."""

    def __init__(self, owner: str) -> None:
        super().__init__(owner)
        self.owner = owner


class WrongPrincipal(Exception):
    """The lease was made by another principal."""


_Claim = tuple[str, datetime, Instant, Owner]


class LeaseStore:
    def __init__(
        self, pool: Database, *, on_abandoned: Callable[[str], None] = lambda _pool: None
    ) -> None:
        """``on_abandoned(pool)``: a claim was undone because its caller was gone."""
        self._pool = pool
        self._on_abandoned = on_abandoned
        self._claims: dict[str, MicroBatcher[_Claim, LeaseRow | None]] = {}
        self._solo_claims: dict[str, MicroBatcher[_Claim, LeaseRow | None]] = {}
        self._returns: MicroBatcher[tuple[str, str, datetime, bool, str], EndedLease | None] = (
            MicroBatcher(self._return_batch)
        )

    async def ping(self, timeout: float) -> None:
        try:
            async with translated():
                await asyncio.wait_for(self._pool.fetchval(probe.PING), timeout)
        except TimeoutError as err:
            raise StoreUnavailable("database did not answer in time") from err

    async def claim_free(
        self, pool: str, tag: str, now: datetime, expires: Instant, owner: Owner | None = None
    ) -> LeaseRow | None:
        """Lease the oldest free instance of ``pool``; None when none is free.
        Concurrent claims on one pool go to the database as one statement; a
        claim under a lease quota goes alone (a refusal must not fail others).
        Raises QuotaExceeded."""
        item = (tag, now, expires, owner or Owner.anonymous(tag))
        # Under a lease quota a claim goes alone (a refusal must not fail others).
        batchers = self._solo_claims if item[3].max_active > 0 else self._claims
        batcher = batchers.get(pool)
        if batcher is None:
            batcher = batchers[pool] = MicroBatcher(
                partial(self._claim_batch, pool),
                on_abandoned=self._unclaim,
                max_batch=1 if batchers is self._solo_claims else MAX_BATCH,
            )
        return await batcher.submit(item)

    async def _unclaim(self, item: _Claim, lease: LeaseRow | None) -> None:
        """The caller of this claim was gone when it committed: undo it."""
        if lease is None:
            return
        try:
            async with translated():
                row = await self._pool.fetchrow(
                    leases_sql.UNCLAIM, lease.instance, lease.leased_at, item[1]
                )
        except StoreError as err:  # the lease then runs out and its VM is destroyed
            log.warning(
                "claim of a caller that gave up not undone",
                instance=lease.instance,
                pool=lease.pool,
                error=str(err),
            )
            return
        if row is not None:
            self._on_abandoned(lease.pool)
            log.info(
                "claim returned to the pool: its caller was gone",
                instance=lease.instance,
                pool=lease.pool,
                service_tag=lease.service_tag,
            )

    async def drain(self) -> None:
        """Wait for batches and undone claims still in progress."""
        for batcher in [*self._claims.values(), *self._solo_claims.values()]:
            await batcher.drain()
        await self._returns.drain()

    async def _claim_batch(self, pool: str, items: list[_Claim]) -> list[LeaseRow | None]:
        now = max(item[1] for item in items)
        expiries = [expiry_columns(item[2]) for item in items]
        async with translated():
            rows = await self._pool.fetch(
                leases_sql.CLAIM_FREE,
                pool,
                len(items),
                [item[0] for item in items],
                [at for at, _ in expiries],
                now,
                [item[3].principal for item in items],
                [item[3].key for item in items],
                [item[3].max_active for item in items],
                [round_ns for _, round_ns in expiries],
            )
        out: list[LeaseRow | None] = [None] * len(items)
        for row in rows:
            out[row["n"] - 1] = LeaseRow.of(row)
        return out

    async def serve_reserved(
        self, reservation: UUID, now: datetime, expires: Instant, lease_limit: int = 0
    ) -> tuple[LeaseRow, datetime] | None:
        """Lease the instance set aside for ``reservation``; (lease, enqueued_at).
        Raises QuotaExceeded when the owner holds ``lease_limit`` leases already
        (the reservation keeps its instance)."""
        async with translated():
            row = await self._pool.fetchrow(
                leases_sql.SERVE_RESERVED, reservation, now, *expiry_columns(expires), lease_limit
            )
        return (LeaseRow.of(row), row["enqueued_at"]) if row else None

    async def lookup_reservation(self, reservation: UUID) -> ReservationState | None:
        async with translated():
            rows = await self._pool.fetch(leases_sql.RESERVATION_LOOKUP, reservation)
        if not rows:
            return None
        # An active lease wins over history; a queue entry is exclusive with both.
        order = {"lease": 0, "queued": 1, "ended": 2}
        row = min(rows, key=lambda r: order[r["kind"]])
        return record_of(ReservationState, row, expires_at=expiry_of(row))

    async def claim_or_enqueue(
        self,
        pool: str,
        tag: str,
        reservation: UUID,
        now: datetime,
        lease_expires: Instant,
        queue_expires: datetime,
        owner: Owner | None = None,
    ) -> FirstUse | None:
        """First use of ``reservation``: a lease if an instance is free, else a
        queue place; None if the pool is drained. Raises Duplicate when the same
        id was used concurrently (look it up again), QuotaExceeded over a quota."""
        who = owner or Owner.anonymous(tag)
        lease_at, round_ns = expiry_columns(lease_expires)
        async with translated():
            row = await self._pool.fetchrow(
                leases_sql.CLAIM_OR_ENQUEUE,
                pool,
                tag,
                reservation,
                now,
                lease_at,
                queue_expires,
                who.principal,
                who.key,
                who.max_queued,
                who.max_active,
                round_ns,
            )
        if row is None:
            return None
        if row["served"]:
            return FirstUse(LeaseRow.of(row), None)
        return FirstUse(None, int(row["seq"]))

    async def touch(self, reservation: UUID, expires: datetime) -> Queued | None:
        async with translated():
            row = await self._pool.fetchrow(leases_sql.TOUCH_RESERVATION, reservation, expires)
        return Queued(row["instance"], row["seq"], row["pool"]) if row else None

    async def poll_queued(self, reservation: UUID, expires: datetime) -> tuple[int, int] | None:
        """Keep a reservation queued with nothing set aside alive until ``expires``
        and say its (position, length), in one statement; None when it is not
        (any more) queued with nothing set aside, or its pool is not RUNNING."""
        async with translated():
            row = await self._pool.fetchrow(leases_sql.POLL_QUEUED, reservation, expires)
        return (int(row["position"]), int(row["length"])) if row else None

    async def position(self, pool: str, seq: int) -> tuple[int, int]:
        async with translated():
            row = await self._pool.fetchrow(leases_sql.QUEUE_POSITION, pool, seq)
        assert row is not None  # an aggregate always has a row
        return int(row["position"]), int(row["length"])

    async def return_lease(
        self,
        instance: str,
        tag: str,
        now: datetime,
        *,
        notify: bool = True,
        principal: str = "anonymous",
    ) -> EndedLease:
        """End the lease and mark the VM for destruction. Concurrent returns go
        to the database as one statement; ``notify`` wakes the reconciler of
        another process (NOTIFY)."""
        ended = await self._returns.submit((instance, tag, now, notify, principal))
        if ended is not None:
            return ended
        async with translated():
            owner = await self._pool.fetchrow(leases_sql.LEASE_OWNER, instance)
        if owner is None:
            raise NotLeased(instance)
        if owner["principal"] != principal:
            raise WrongPrincipal(owner["principal"])
        raise WrongTag(owner["service_tag"])

    async def _return_batch(
        self, items: list[tuple[str, str, datetime, bool, str]]
    ) -> list[EndedLease | None]:
        async with translated():
            rows = await self._pool.fetch(
                leases_sql.RETURN_LEASES,
                [item[0] for item in items],
                [item[1] for item in items],
                max(item[2] for item in items),
                any(item[3] for item in items),
                [item[4] for item in items],
            )
        ended = {(r["instance"], r["service_tag"], r["principal"]): r for r in rows}
        out: list[EndedLease | None] = []
        for instance, tag, _, _, principal in items:
            # A duplicate request finds nothing.
            row = ended.pop((instance, tag, principal), None)
            out.append(
                EndedLease(instance, row["pool"], tag, row["leased_at"], principal) if row else None
            )
        return out

    async def force_return(
        self, instance: str, now: datetime, reason: str, by: str = "anonymous"
    ) -> EndedLease:
        """End the lease as an operator ``by`` (the principal its event names)."""
        async with translated():
            row = await self._pool.fetchrow(leases_sql.FORCE_RETURN, instance, now, reason, by)
        if row is None:
            raise NotLeased(instance)
        return EndedLease(
            instance, row["pool"], row["service_tag"], row["leased_at"], row["principal"]
        )

    async def own_reservations(self, principal: str, tag: str, pool: str) -> list[dict[str, Any]]:
        """The queued reservations of ``principal`` with ``tag`` (in ``pool``, or every
        pool for ""), each with its position in its pool's queue."""
        async with translated():
            rows = await self._pool.fetch(leases_sql.LIST_OWN_RESERVATIONS, pool, principal, tag)
        return [dict(r) for r in rows]

    async def get_lease(self, instance: str) -> LeaseRow | None:
        async with translated():
            row = await self._pool.fetchrow(leases_sql.GET_LEASE, instance)
        return LeaseRow.of(row) if row else None

    async def extend(
        self,
        instance: str,
        tag: str,
        decide: Callable[[LeaseRow], Instant | None],
        principal: str = "anonymous",
    ) -> LeaseRow:
        """Lock the lease, let ``decide`` pick the new expiry (None: unchanged), write it."""
        async with translated(), self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(leases_sql.LOCK_LEASE, instance)
            if row is None:
                raise NotLeased(instance)
            lease = LeaseRow.of(row)
            if lease.principal != principal:
                raise WrongPrincipal(lease.principal)
            if lease.service_tag != tag:
                raise WrongTag(lease.service_tag)
            new = decide(lease)
            if new is None or new == lease.expires_at:
                return lease
            return LeaseRow.of(
                await conn.fetchrow(leases_sql.SET_EXPIRY, instance, *expiry_columns(new))
            )

    async def free_counts(self) -> dict[str, int]:
        async with translated():
            rows = await self._pool.fetch(leases_sql.FREE_COUNTS)
        return {r["pool"]: int(r["free"]) for r in rows}

    async def pool_desired_status(self, pool: str) -> str | None:
        async with translated():
            status: str | None = await self._pool.fetchval(leases_sql.POOL_DESIRED_STATUS, pool)
            return status

    async def cancel_reservation(
        self, reservation: UUID, tag: str, principal: str, now: datetime
    ) -> tuple[str, str | None] | None:
        """Withdraw a queued reservation of ``tag`` and ``principal``: (pool,
        set-aside instance), or None when they have no queued reservation by this id."""
        async with translated():
            row = await self._pool.fetchrow(
                leases_sql.CANCEL_RESERVATION, reservation, tag, now, principal
            )
        return (row["pool"], row["instance"]) if row else None
