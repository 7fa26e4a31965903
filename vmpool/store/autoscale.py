"""Adaptive warm pools' SQL (issue 24): demand counts and what the leader learned.

Every call is one statement; writes are batched over pools (unnest), so the
reconciler's idle cost does not grow with them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from vmpool.domain.autoscale import Learned
from vmpool.store.db import Database
from vmpool.store.errors import translated

ADD_ARRIVALS = """
INSERT INTO autoscale_arrivals (pool, second, n)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[])
ON CONFLICT (pool, second) DO UPDATE SET n = autoscale_arrivals.n + excluded.n
"""

ARRIVALS_SINCE = """
SELECT pool, second, n FROM autoscale_arrivals WHERE second >= $1 ORDER BY second
"""

PRUNE_ARRIVALS = "DELETE FROM autoscale_arrivals WHERE second < $1"

LOAD_STATES = """
SELECT pool, s, hold, raised_at, boots, profile_days, profile FROM autoscale_state
"""

SAVE_STATES = """
INSERT INTO autoscale_state
    (pool, s, hold, raised_at, boots, profile_days, profile, decision, updated_at)
SELECT x.pool, x.s, x.hold, x.raised_at,
       ARRAY(SELECT jsonb_array_elements_text(x.boots)::float8),
       ARRAY(SELECT jsonb_array_elements_text(x.profile_days)::int),
       x.profile, x.decision, now()
FROM jsonb_to_recordset($1::jsonb) AS x(
    pool text, s int, hold int, raised_at float8, boots jsonb, profile_days jsonb, profile jsonb,
    decision jsonb)
ON CONFLICT (pool) DO UPDATE SET
    s = excluded.s, hold = excluded.hold, raised_at = excluded.raised_at,
    boots = excluded.boots, profile_days = excluded.profile_days,
    profile = excluded.profile, decision = excluded.decision, updated_at = excluded.updated_at
"""

OLDEST_READY = """
SELECT name FROM instances WHERE pool = $1 AND state = 'ready'
ORDER BY ready_at, name LIMIT $2
"""

DECISIONS = "SELECT pool, decision, updated_at FROM autoscale_state"

Arrival = tuple[str, int, int]  # pool, second, count


#: Runs statements in one transaction that first checks this process still
#: leads (vmpool.store.inventory.Inventory.fenced).
Fenced = Callable[[Sequence[tuple[str, tuple[Any, ...]]]], Awaitable[None]]


class AutoscaleStore:
    def __init__(self, db: Database, fenced: Fenced | None = None) -> None:
        self._db = db
        self._fenced = fenced  # the leader's state writes: a deposed leader's are refused

    async def add_arrivals(self, rows: Sequence[Arrival]) -> None:
        if not rows:
            return
        pools, seconds, counts = (list(col) for col in zip(*rows, strict=True))
        async with translated():
            await self._db.execute(ADD_ARRIVALS, pools, seconds, counts)

    async def arrivals_since(self, second: int) -> list[Arrival]:
        async with translated():
            rows = await self._db.fetch(ARRIVALS_SINCE, second)
        return [(r["pool"], r["second"], r["n"]) for r in rows]

    async def prune_arrivals(self, before_second: int) -> None:
        async with translated():
            await self._db.execute(PRUNE_ARRIVALS, before_second)

    async def oldest_ready(self, pool: str, limit: int) -> list[str]:
        """Up to ``limit`` ready instances of ``pool``, the longest ready first."""
        async with translated():
            return [r["name"] for r in await self._db.fetch(OLDEST_READY, pool, limit)]

    async def load_states(self) -> dict[str, Learned]:
        async with translated():
            rows = await self._db.fetch(LOAD_STATES)
        return {
            r["pool"]: Learned(
                boots=list(r["boots"]),
                profile_days=list(r["profile_days"]),
                profile=r["profile"],  # the connection decodes jsonb
                s=r["s"],
                hold=r["hold"],
                raised_at=r["raised_at"],
            )
            for r in rows
        }

    async def decisions(self) -> dict[str, dict[str, Any]]:
        """Per pool: the leader's last decision (as saved) and ``decided_at``."""
        async with translated():
            rows = await self._db.fetch(DECISIONS)
        return {r["pool"]: {**r["decision"], "decided_at": r["updated_at"]} for r in rows}

    async def save_states(
        self,
        states: Mapping[str, Learned],
        decisions: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Every pool's state in one statement (a JSON array of records)."""
        if not states:
            return
        records = [
            {
                "pool": name,
                "s": x.s,
                "hold": x.hold,
                "raised_at": x.raised_at,
                "boots": x.boots,
                "profile_days": x.profile_days,
                "profile": x.profile,
                "decision": dict((decisions or {}).get(name, {})),
            }
            for name, x in sorted(states.items())
        ]
        if self._fenced is not None:
            await self._fenced([(SAVE_STATES, (records,))])
            return
        async with translated():
            await self._db.execute(SAVE_STATES, records)
