"""Graceful shutdown: SIGTERM while calls are in flight (spec: drain in-flight calls,
exit cleanly)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tests.e2e.clients import Client, RpcError
from tests.e2e.conftest import Running
from tests.polling import eventually

POOLS = [
    {"name": "busy", "min_ready": 2, "max_size": 3},
    {"name": "none", "min_ready": 0, "max_size": 0},
]


@dataclass
class Call:
    method: str
    started: float
    code: str = ""
    message: str = ""
    ended: float = 0.0
    instance: str = ""


async def timed(method: str, coro: Awaitable[object]) -> Call:
    call = Call(method, time.monotonic())
    try:
        result = await coro
        call.code = "OK"
        call.instance = getattr(result, "instance", "")
    except RpcError as err:
        call.code, call.message = err.code, err.message
    call.ended = time.monotonic()
    return call


async def test_sigterm_drains_in_flight_calls_and_exits_cleanly(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
) -> None:
    server = await start_server(POOLS, name="shutdown", shutdown_grace="10s")
    await server.wait_ready("busy", 2)
    clients = [client_factory(kind, server.address) for kind in ("grpclib", "grpcio")]

    # Leases waiting server-side for an instance that never comes.
    waiting = [
        asyncio.create_task(
            timed(
                "Lease-wait",
                c.lease("none", reservation_id=str(uuid.uuid4()), wait="20s", timeout=30),
            )
        )
        for c in clients
        for _ in range(2)
    ]

    async def queued() -> int:
        rows = await server.sql("SELECT count(*) AS n FROM reservations WHERE pool = 'none'")
        return int(rows[0]["n"])

    await eventually(queued, lambda n: n == 4, 5, "4 reservations queued")

    # A stream of short calls that keeps going through the shutdown.
    stream: list[Call] = []
    stop = asyncio.Event()

    async def chatter(c: Client) -> None:
        while not stop.is_set():
            stream.append(await timed("Ping", c.ping(timeout=5)))
            lease = await timed("Lease", c.lease("busy", timeout=5))
            stream.append(lease)
            if lease.code == "OK":
                stream.append(await timed(f"Return {lease.instance}", c.return_(lease.instance)))
            await asyncio.sleep(0.01)

    chatterers = [asyncio.create_task(chatter(c)) for c in clients for _ in range(2)]

    async def answered_ok() -> int:
        return sum(c.code == "OK" for c in stream)

    # Running for real before the signal (0.5 s alone was too short on a loaded machine).
    await eventually(answered_ok, lambda n: n >= 10, 30, "ten calls answered OK")
    await asyncio.sleep(0.5)
    assert server.proc.proc is not None
    sigterm = time.monotonic()
    server.proc.proc.send_signal(signal.SIGTERM)
    status = await asyncio.to_thread(server.proc.proc.wait, 15)
    exited = time.monotonic() - sigterm
    stop.set()
    await asyncio.gather(*chatterers)
    waited = await asyncio.gather(*waiting)

    assert status == 0, server.proc.log()[-3000:]
    assert exited < 15
    for call in waited:
        # A waiting Lease is answered at once with its place in the queue.
        assert call.code == "RESOURCE_EXHAUSTED", call
        assert "queued at position" in call.message, call
        assert call.ended - sigterm < 5, f"a waiting Lease held the shutdown: {call}"
    bad = [c for c in stream if c.code not in ("OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE")]
    assert not bad, bad
    # Calls that were running when the signal came finish normally.
    early = [c for c in stream if c.ended > sigterm and c.started < sigterm - 0.5]
    assert all(c.code in ("OK", "RESOURCE_EXHAUSTED") for c in early), early
    log = server.proc.log()
    assert "Traceback" not in log, log[-4000:]
    assert '"stopped"' in log

    # Nothing answered OK was lost: leases granted and not returned are in the store.
    granted = {c.instance for c in stream if c.method == "Lease" and c.code == "OK"}
    returned = {c.method.split()[1] for c in stream if c.method.startswith("Return")}
    rows = await server.sql("SELECT instance FROM leases WHERE pool = 'busy'")
    assert granted - returned <= {r["instance"] for r in rows}
