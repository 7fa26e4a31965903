"""A hypothesis state machine: Leaser + Reconciler on a real PostgreSQL against a
small in-Python model of the lease rules (spec sections 3-6).

Each example gets a fresh database (tests.integration.helpers.make_world) and a
movable clock. The model tracks leases, the reservation queue and every
instance ever leased; the supply of free instances is the reconciler's, so it
is read from the database, and the reconciler is checked separately after
every `reconcile` step (FIFO set-aside, pool sizing, VMs = rows).

HYPOTHESIS_PROFILE=long runs many more and longer examples.
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.integration.helpers import World, make_world
from tests.pg import TestPostgres
from vmpool.core.instant import Instant
from vmpool.domain import leasing
from vmpool.store.db import Database, create_pool
from vmpool.store.records import expiry_of

POOL = "p"
MIN_READY, MAX_SIZE = 1, 3
DEFAULT_LEASE = timedelta(minutes=10)
MAX_LEASE = timedelta(hours=1)
TTL = timedelta(minutes=5)
CONFIG = {
    "pools": [
        {
            "name": POOL,
            "min_ready": MIN_READY,
            "max_size": MAX_SIZE,
            "max_provisioning": 2,
            "default_lease": "10m",
            "max_lease": "1h",
            "reservation_ttl": "5m",
        }
    ]
}
TAGS = st.sampled_from(["alpha", "beta", ""])  # "" is a tag like any other

PROFILES = {
    "ci": {"max_examples": 25, "stateful_step_count": 30},
    "long": {"max_examples": 300, "stateful_step_count": 60},
}
PROFILE = PROFILES[os.environ.get("HYPOTHESIS_PROFILE", "ci")]

_postgres: list[TestPostgres] = []  # the session's server, for the state machine


@dataclass
class ModelLease:
    tag: str
    rid: uuid.UUID | None
    expires: Instant


@dataclass
class Queued:
    rid: uuid.UUID
    tag: str
    expires: datetime


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pool: Database | None = None
        self.dbname = ""
        self.leases: dict[str, ModelLease] = {}
        self.used: set[str] = set()  # every instance ever leased
        self.ended: list[str] = []  # insertion order: draws must not depend on random names
        self.queue: list[Queued] = []
        self.aside: dict[uuid.UUID, str] = {}
        self.served: dict[uuid.UUID, str] = {}  # rid -> instance (rule 1)
        self.forgotten: list[uuid.UUID] = []  # expired from the queue: new again

    # --- plumbing -------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @initialize()
    def setup(self) -> None:
        url = self.run(_postgres[0].fresh())
        self.dbname = urllib.parse.urlsplit(url).path.lstrip("/")
        self.pool = self.run(create_pool(url, min_size=1, max_size=4))
        self.world: World = self.run(make_world(self.pool, CONFIG))
        self.run(self.world.settle())
        self._read_aside()

    def teardown(self) -> None:
        async def close() -> None:
            if self.pool is not None:
                await self.world.reconciler.drain_calls()
                await self.pool.close()
            if self.dbname and _postgres:
                admin = await asyncpg.connect(_postgres[0].url)
                try:
                    await admin.execute(f"DROP DATABASE IF EXISTS {self.dbname} WITH (FORCE)")
                finally:
                    await admin.close()

        try:
            self.run(close())
        finally:
            self.loop.close()

    @property
    def now(self) -> datetime:
        return self.world.clock.now

    def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        assert self.pool is not None
        return list(self.run(self.pool.fetch(query, *args)))

    def ready(self) -> set[str]:
        return {
            r["name"]
            for r in self.fetch(
                "SELECT name FROM instances WHERE pool = $1 AND state = 'ready'", POOL
            )
        }

    def waiting(self) -> bool:
        """A queued reservation with nothing set aside blocks requests without one."""
        return any(q.rid not in self.aside for q in self.queue)

    def _read_aside(self) -> None:
        rows = self.fetch("SELECT id, instance FROM reservations WHERE NOT served")
        self.aside = {r["id"]: r["instance"] for r in rows if r["instance"] is not None}

    def lease_call(self, tag: str, rid: uuid.UUID | None) -> tuple[str, Any]:
        try:
            return "OK", self.run(self.world.leaser.lease(POOL, None, tag, rid))
        except leasing.ClientError as err:
            return type(err).__name__, err

    def granted(self, lease: Any, tag: str, rid: uuid.UUID | None, ready: set[str]) -> None:
        assert lease.instance not in self.used, f"{lease.instance} leased a second time"
        assert lease.instance in ready, f"{lease.instance} was not free"
        assert lease.expires_at == Instant.from_datetime(self.now + DEFAULT_LEASE)
        assert lease.leased_at == self.now
        self.used.add(lease.instance)
        self.leases[lease.instance] = ModelLease(tag, rid, lease.expires_at)

    # --- rules ----------------------------------------------------------------------------

    @rule(tag=TAGS)
    def lease_plain(self, tag: str) -> None:
        ready = self.ready()
        expect_ok = bool(ready) and not self.waiting()
        code, got = self.lease_call(tag, None)
        if expect_ok:
            assert code == "OK", got
            self.granted(got, tag, None, ready)
        else:
            assert code == "Exhausted", got

    @rule(tag=TAGS)
    def reserve_new(self, tag: str) -> None:
        self._reserve_fresh(uuid.uuid4(), tag)

    def _reserve_fresh(self, rid: uuid.UUID, tag: str) -> None:
        ready = self.ready()
        code, got = self.lease_call(tag, rid)
        if ready and not self.waiting():
            assert code == "OK", got
            self.granted(got, tag, rid, ready)
            self.served[rid] = got.instance
        else:
            assert code == "Exhausted", got
            n = len(self.queue) + 1
            assert f"queued at position {n} of {n}" in str(got), str(got)
            self.queue.append(Queued(rid, tag, self.now + TTL))

    @precondition(lambda self: self.forgotten)
    @rule(data=st.data())
    def reserve_forgotten(self, data: st.DataObject) -> None:
        """A reservation that expired from the queue is new again when retried."""
        rid = data.draw(st.sampled_from(self.forgotten))
        self.forgotten.remove(rid)
        self._reserve_fresh(rid, data.draw(TAGS))

    @precondition(lambda self: self.queue or self.served)
    @rule(data=st.data(), wrong_tag=st.booleans())
    def reserve_again(self, data: st.DataObject, wrong_tag: bool) -> None:
        known = [q.rid for q in self.queue] + list(self.served)
        rid = data.draw(st.sampled_from(known))
        queued = next((q for q in self.queue if q.rid == rid), None)
        if queued is not None:
            tag = queued.tag
        else:
            instance = self.served[rid]
            tag = self.leases[instance].tag if instance in self.leases else "alpha"
            if instance not in self.leases:
                tag = self._history_tag(instance)
        if wrong_tag:
            code, got = self.lease_call("gamma", rid)
            assert code == "PermissionDenied", got
            return
        ready = self.ready()
        code, got = self.lease_call(tag, rid)
        if queued is None:
            instance = self.served[rid]
            if instance in self.leases:
                assert code == "OK", got
                assert got.instance == instance
                assert got.expires_at == self.leases[instance].expires
            else:
                assert code == "FailedPrecondition", got
            return
        if rid in self.aside:
            assert code == "OK", got
            assert got.instance == self.aside[rid]
            self.queue.remove(queued)
            del self.aside[rid]
            self.granted(got, tag, rid, ready | {got.instance})
            self.served[rid] = got.instance
        else:
            assert code == "Exhausted", got
            pos = self.queue.index(queued) + 1
            assert f"queued at position {pos} of {len(self.queue)}" in str(got), str(got)
            queued.expires = max(queued.expires, self.now + TTL)

    def _history_tag(self, instance: str) -> str:
        rows = self.fetch("SELECT service_tag FROM lease_history WHERE instance = $1", instance)
        return str(rows[0]["service_tag"]) if rows else "alpha"

    @precondition(lambda self: self.leases or self.ended)
    @rule(data=st.data(), wrong_tag=st.booleans())
    def return_(self, data: st.DataObject, wrong_tag: bool) -> None:
        instance = data.draw(st.sampled_from(list(self.leases) + self.ended))
        active = self.leases.get(instance)
        tag = "gamma" if wrong_tag else (active.tag if active else "alpha")
        try:
            self.run(self.world.leaser.return_(instance, tag))
            code = "OK"
        except leasing.ClientError as err:
            code = type(err).__name__
        if active is None:
            assert code == "NotFound"
        elif wrong_tag:
            assert code == "PermissionDenied"
        else:
            assert code == "OK"
            del self.leases[instance]
            self.ended.append(instance)

    @precondition(lambda self: self.leases)
    @rule(
        data=st.data(),
        delta=st.integers(min_value=-600, max_value=3 * 3600),
        nanos=st.integers(min_value=0, max_value=999_999_999),
        extend_only=st.booleans(),
    )
    def extend(self, data: st.DataObject, delta: int, nanos: int, extend_only: bool) -> None:
        instance = data.draw(st.sampled_from(list(self.leases)))
        lease = self.leases[instance]
        to = Instant(Instant.from_datetime(self.now + timedelta(seconds=delta)).ns + nanos)
        try:
            got = self.run(self.world.leaser.extend_to(instance, to, lease.tag, extend_only))
            code = "OK"
        except leasing.ClientError as err:
            code, got = type(err).__name__, err
        if to <= Instant.from_datetime(self.now) and not extend_only:
            assert code == "InvalidArgument", got
            return
        assert code == "OK", got
        new = min(to, Instant.from_datetime(self.now + MAX_LEASE))
        expected = lease.expires if extend_only and new <= lease.expires else new
        assert got.expires_at == expected
        lease.expires = expected

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        instance = data.draw(st.sampled_from(list(self.leases)))
        got = self.run(self.world.leaser.get(instance))
        assert got.expires_at == self.leases[instance].expires

    @rule(seconds=st.sampled_from([1, 30, 200, 301, 599, 601, 1800, 3601]))
    def expire(self, seconds: int) -> None:
        """Time passes (nothing happens until the reconciler runs)."""
        self.world.clock.advance(seconds=seconds)

    @rule()
    def reconcile(self) -> None:
        self.run(self.world.settle())
        now = self.now
        for instance, lease in list(self.leases.items()):
            if lease.expires <= Instant.from_datetime(now):
                del self.leases[instance]
                self.ended.append(instance)
        for q in list(self.queue):
            if q.expires <= now:
                self.queue.remove(q)
                self.forgotten.append(q.rid)
        self._read_aside()
        # FIFO: instances are set aside for the oldest queued reservations.
        flags = [q.rid in self.aside for q in self.queue]
        assert flags == sorted(flags, reverse=True), f"set aside out of order: {flags}"
        # Sizing (spec section 6), once settled.
        counts = {
            r["state"]: int(r["n"])
            for r in self.fetch(
                "SELECT state, count(*) AS n FROM instances WHERE pool = $1 GROUP BY state", POOL
            )
        }
        total = sum(n for s, n in counts.items() if s != "destroying")
        assert total <= MAX_SIZE, counts
        if total < MAX_SIZE:
            assert not self.waiting(), (counts, flags)
            assert counts.get("ready", 0) >= MIN_READY, counts
        assert counts.get("provisioning", 0) == 0 and counts.get("destroying", 0) == 0, counts
        # Every row has its VM and every VM its row.
        assert self.run(self.world.vms()) == self.run(self.world.rows())

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        if self.pool is None:
            return
        rows = self.fetch(
            "SELECT instance, expires_at, expires_round_ns, service_tag, reservation_id FROM leases"
        )
        db = {r["instance"]: (expiry_of(r), r["service_tag"], r["reservation_id"]) for r in rows}
        model = {i: (m.expires, m.tag, m.rid) for i, m in self.leases.items()}
        assert db == model
        history = self.fetch("SELECT instance FROM lease_history")
        names = [r["instance"] for r in history]
        assert len(names) == len(set(names)), "an instance was leased twice"
        assert set(names) == set(self.ended)
        queued = [
            r["id"] for r in self.fetch("SELECT id FROM reservations WHERE NOT served ORDER BY seq")
        ]
        assert queued == [q.rid for q in self.queue]


@pytest.mark.timeout(600 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 300)
def test_leaser_and_reconciler_follow_the_model(postgres: TestPostgres) -> None:
    _postgres[:] = [postgres]
    run_state_machine_as_test(
        LeaseMachine,
        settings=settings(
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            derandomize=os.environ.get("HYPOTHESIS_PROFILE") != "long",
            **PROFILE,
        ),
    )
