"""What every chaos scenario uses: a PostgreSQL we can stop, a client storm that
logs every answer with its times, and a sampler of pool sizes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from tests.pg import TestPostgres
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.proto.vmpool.admin import v1 as adm

TAG = "chaos"
_POSITION = re.compile(r"queued at position (\d+) of (\d+)")


# --- PostgreSQL we control ------------------------------------------------------------


class ChaosPostgres(TestPostgres):
    """An embedded PostgreSQL (pgserver) of our own, so a scenario can stop it and
    start it again (`pg_ctl stop -m immediate`: a crash, no clean shutdown)."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        self._dir = tempfile.mkdtemp(prefix="vmpool-chaos-pg-")
        self._server: Any = pgserver.get_server(self._dir, cleanup_mode="delete")
        self.url = self._server.get_uri()

    def crash(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(
            ["-w", "stop", "-m", "immediate"],
            pgdata=self._server.pgdata,
            user=self._server.system_user,
            timeout=30,
        )

    def kill(self) -> None:
        """SIGKILL of the postmaster and every backend at once, as when its
        container or machine dies: no shutdown at all, shared memory left behind."""
        pidfile = Path(self._server.pgdata) / "postmaster.pid"
        postmaster = int(pidfile.read_text().split()[0])
        children = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _parent(p) == postmaster
        ]
        for pid in [postmaster, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in [postmaster, *children]
        ):
            time.sleep(0.05)

    def restart(self, timeout: float = 120.0) -> None:
        """Start it again. After an immediate stop it replays its WAL first,
        which on a busy machine can take longer than the 10 s pgserver gives
        pg_ctl; the server goes on starting after that, so wait for it."""
        try:
            self._server.ensure_postgres_running()
            return
        except subprocess.TimeoutExpired:
            pass
        pidfile = Path(self._server.pgdata) / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # The postmaster writes "ready" as the file's last line once it
            # accepts connections.
            with contextlib.suppress(OSError):
                if pidfile.read_text().split()[-1:] == ["ready"]:
                    self._server.ensure_postgres_running()
                    return
            time.sleep(0.2)
        raise TimeoutError(f"PostgreSQL not accepting connections {timeout:.0f}s after restart")


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


async def sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


# --- the client's log -----------------------------------------------------------------


@dataclass
class Call:
    """One RPC as the client saw it; times are wall-clock seconds (time.time())."""

    kind: str  # Lease | Return | ExtendTo | Ping
    t0: float
    t1: float
    code: str
    pool: str = ""
    instance: str = ""
    rid: str | None = None
    expires: datetime | None = None
    message: str = ""
    worker: int = -1


@dataclass
class Log:
    calls: list[Call] = field(default_factory=list)
    #: (start, end) wall-clock windows in which the scenario broke something on purpose.
    disturbed: list[tuple[float, float]] = field(default_factory=list)

    def add(self, call: Call) -> None:
        self.calls.append(call)

    def codes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.calls:
            key = f"{c.kind}:{c.code}"
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))


class Client:
    """The project's own stack (grpclib + betterproto stubs); every call is logged."""

    def __init__(self, address: str, log: Log, worker: int = -1) -> None:
        host, _, port = address.rpartition(":")
        self._channel = Channel(host, int(port))
        self._stub = api.VmPoolLeaseServiceStub(self._channel)
        self._extension = adm.VmPoolExtensionServiceStub(self._channel)
        self._log = log
        self._worker = worker

    async def _call(self, call: Call, coro: Any) -> Any:
        reply = None
        try:
            reply = await coro
            call.code = "OK"
        except GRPCError as err:
            call.code = err.status.name
            call.message = err.message or ""
        except TimeoutError:
            call.code = "DEADLINE_EXCEEDED"
        except Exception as err:  # transport: the server died, refused, reset
            call.code = "UNAVAILABLE"
            call.message = f"client: {type(err).__name__}: {err}"[:200]
        call.t1 = time.time()
        self._log.add(call)
        return reply

    def _new(self, kind: str, **kw: Any) -> Call:
        return Call(kind, time.time(), 0.0, "", worker=self._worker, **kw)

    async def ping(self, timeout: float = 2.0) -> Call:
        call = self._new("Ping")
        await self._call(call, self._stub.ping(Empty(), timeout=timeout))
        return call

    async def lease(
        self, pool: str, rid: str | None = None, wait: str | None = None, timeout: float = 5.0
    ) -> Call:
        call = self._new("Lease", pool=pool, rid=rid)
        metadata = {"x-vmpool-wait": wait} if wait else None
        request = api.LeaseRequest(pool=pool, service_tag=TAG, reservation_id=rid)
        reply = await self._call(
            call, self._stub.lease(request, timeout=timeout, metadata=metadata)
        )
        if reply is not None:
            call.instance = reply.lease.instance
            call.expires = reply.lease.expires
        return call

    async def return_(self, instance: str, pool: str) -> Call:
        call = self._new("Return", pool=pool, instance=instance)
        request = api.ReturnRequest(instance=instance, service_tag=TAG)
        await self._call(call, self._stub.return_(request, timeout=5))
        return call

    async def extend_to(self, instance: str, pool: str, to: datetime) -> Call:
        call = self._new("ExtendTo", pool=pool, instance=instance)
        request = api.ExtendToRequest(instance=instance, to=to, service_tag=TAG)
        reply = await self._call(call, self._stub.extend_to(request, timeout=5))
        if reply is not None:
            call.expires = reply.lease.expires
        return call

    async def cancel(self, rid: str, pool: str) -> Call:
        """CancelReservation; ``message`` keeps the outcome when OK."""
        call = self._new("CancelReservation", pool=pool, rid=rid)
        request = adm.CancelReservationRequest(reservation_id=rid, service_tag=TAG)
        reply = await self._call(call, self._extension.cancel_reservation(request, timeout=5))
        if reply is not None:
            call.message = reply.outcome
        return call

    def close(self) -> None:
        self._channel.close()


def queue_position(message: str) -> int | None:
    m = _POSITION.search(message)
    return int(m.group(1)) if m else None


# --- the storm ------------------------------------------------------------------------


@dataclass
class StormConfig:
    pools: list[str]
    workers: int = 12
    reservation_share: float = 0.6
    wait: str = "2s"  # x-vmpool-wait on reservation Leases
    give_up_after: float = 25.0  # a reservation client stops retrying after this
    hold: tuple[float, float] = (0.1, 1.2)  # seconds a lease is held
    extend_share: float = 0.4
    extend_by: tuple[float, float] = (5.0, 40.0)  # ExtendTo(now + this)
    abandon_share: float = 0.1  # leases never returned (they expire)
    cancel_share: float = 0.0  # queued reservations withdrawn (CancelReservation)


class Storm:
    """Workers that Lease (plain or with a reservation id and x-vmpool-wait), hold,
    sometimes ExtendTo, and Return, until stopped. Errors are retried."""

    def __init__(self, address: str, config: StormConfig, log: Log, seed: int = 0) -> None:
        self.address = address
        self.config = config
        self.log = log
        self._stop = asyncio.Event()
        self._rng = random.Random(seed)
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[Client] = []

    def start(self) -> None:
        for i in range(self.config.workers):
            client = Client(self.address, self.log, worker=i)
            self._clients.append(client)
            self._tasks.append(asyncio.create_task(self._worker(client, i), name=f"storm-{i}"))

    async def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"storm worker crashed: {task.exception()!r}")
        for client in self._clients:
            client.close()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _worker(self, client: Client, i: int) -> None:
        rng = random.Random(self._rng.random())
        cfg = self.config
        while not self._stop.is_set():
            pool = rng.choice(cfg.pools)
            if rng.random() < cfg.reservation_share:
                lease = await self._reserve(client, pool, rng)
            else:
                lease = await client.lease(pool)
                if lease.code != "OK":
                    await self._pause(rng.uniform(0.05, 0.3))
                    continue
            if lease is None:
                continue
            await self._hold(client, lease, rng)

    async def _reserve(self, client: Client, pool: str, rng: random.Random) -> Call | None:
        rid = str(uuid.uuid4())
        deadline = time.monotonic() + self.config.give_up_after
        wait_s = float(self.config.wait.rstrip("s"))
        first = True
        while time.monotonic() < deadline:
            # The first call asks without x-vmpool-wait, so a queued reservation's
            # first answer is RESOURCE_EXHAUSTED with its place: the client-side
            # record of enqueue order. Retries wait server-side.
            wait = None if first else self.config.wait
            first = False
            call = await client.lease(pool, rid=rid, wait=wait, timeout=wait_s + 3)
            if call.code == "OK":
                return call
            if call.code in ("FAILED_PRECONDITION", "PERMISSION_DENIED", "INVALID_ARGUMENT"):
                return None
            if self._stop.is_set():
                return None  # stopping: give up this reservation (it will expire)
            if call.code != "RESOURCE_EXHAUSTED":
                await asyncio.sleep(rng.uniform(0.1, 0.3))
            elif self.config.cancel_share and rng.random() < self.config.cancel_share:
                await self._withdraw(client, rid, pool, rng)
                return None
        return None

    async def _withdraw(self, client: Client, rid: str, pool: str, rng: random.Random) -> None:
        """CancelReservation until it answers (a lost answer is asked again)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            call = await client.cancel(rid, pool)
            if call.code in ("OK", "NOT_FOUND", "FAILED_PRECONDITION"):
                return
            await asyncio.sleep(rng.uniform(0.1, 0.3))

    async def _hold(self, client: Client, lease: Call, rng: random.Random) -> None:
        cfg = self.config
        await self._pause(rng.uniform(*cfg.hold))
        if rng.random() < cfg.extend_share:
            to = datetime.now(UTC) + timedelta(seconds=rng.uniform(*cfg.extend_by))
            await client.extend_to(lease.instance, lease.pool, to)
        if rng.random() < cfg.abandon_share:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # even when stopping: do not leak leases
            ret = await client.return_(lease.instance, lease.pool)
            if ret.code in ("OK", "NOT_FOUND"):
                return
            await asyncio.sleep(rng.uniform(0.1, 0.4))


# --- pool size sampler ------------------------------------------------------------------


class Sampler:
    """Counts instances per pool (all states but destroying) every ``interval`` s."""

    def __init__(self, db_url: str, interval: float = 0.2) -> None:
        self.db_url = db_url
        self.interval = interval
        self.max_seen: dict[str, int] = {}
        self.samples = 0
        self.failed = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sampler")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def sample_once(self) -> None:
        try:
            rows = await asyncio.wait_for(
                sql(
                    self.db_url,
                    "SELECT pool, count(*) AS n FROM instances WHERE state <> 'destroying'"
                    " GROUP BY pool",
                ),
                3,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.failed += 1
            return
        self.samples += 1
        for r in rows:
            self.max_seen[r["pool"]] = max(self.max_seen.get(r["pool"], 0), int(r["n"]))

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.sample_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
