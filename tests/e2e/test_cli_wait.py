"""`vmpool lease --wait` and the CLI's outcomes as a script sees them, against a real
server process: how many calls a wait costs, Ctrl-C, restarts, exit codes, JSON errors."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from grpclib.client import Channel

from tests.e2e.clients import Client
from tests.e2e.conftest import Running, lease_when_free
from tests.ops.conftest import scrape
from tests.polling import eventually
from vmpool.proto.vmpool.admin import v1 as adm

POOLS = [
    # reservation_ttl far longer than the tests: an abandoned reservation would
    # hold its place (and a VM set aside for it) for all of it.
    {"name": "solo", "min_ready": 1, "max_size": 1, "reservation_ttl": "5m"},
    {"name": "wide", "min_ready": 2, "max_size": 3},
]


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[Running]]) -> AsyncIterator[Running]:
    running = await start_server(POOLS, name="cliwait")
    await running.wait_ready("solo", 1)
    yield running
    running.assert_clean_log()


def vmpool_args(
    server: Running, *args: str, tag: str = "cli-wait", connect: bool = True
) -> list[str]:
    """`vmpool ARGS`, with the server and tag unless ``connect`` is false."""
    flags = ["--server", server.address, "--service-tag", tag] if connect else []
    return [sys.executable, "-m", "vmpool", *args, *flags]


async def run(
    server: Running, *args: str, tag: str = "cli-wait"
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        vmpool_args(server, *args, tag=tag),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@asynccontextmanager
async def cli_running(
    server: Running, *args: str, stdout: Any = asyncio.subprocess.PIPE, connect: bool = True
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`vmpool ARGS` started in the background; killed if the test fails first."""
    proc = await asyncio.create_subprocess_exec(
        *vmpool_args(server, *args, connect=connect),
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def served_a_new_vm(
    client: Client, proc: asyncio.subprocess.Process, blocker: str, timeout: float = 30
) -> dict[str, Any]:
    """The background `lease --wait` ends with a VM of "solo" (then returned)."""
    code, got, err = await finished(proc, timeout)
    assert code == 0, err
    assert got["pool"] == "solo" and got["instance"] != blocker, got
    await client.return_(got["instance"], "cli-wait")
    return dict(got)


async def finished(proc: asyncio.subprocess.Process, timeout: float) -> tuple[int, Any, str]:
    """Exit status, stdout as JSON (None if empty) and stderr of a background CLI."""
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out.strip() else None, err.decode()


def lease_calls(server: Running) -> float:
    families = scrape(server.proc.metrics_port)
    return sum(
        s.value
        for f in families.values()
        for s in f.samples
        if s.name == "vmpool_rpc_requests_total" and s.labels.get("method") == "Lease"
    )


def json_error(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    # Every stderr line is a JSON object: progress events while waiting, then the error.
    lines = [json.loads(line) for line in done.stderr.strip().splitlines()]
    assert lines and all(x.get("event") == "waiting" for x in lines[:-1]), done.stderr
    err: dict[str, Any] = lines[-1]
    assert set(err) <= {"code", "message", "reservation_id", "reservation"}, err
    return err


async def queued(server: Running, pool: str) -> list[Any]:
    return await server.sql(
        "SELECT id, instance FROM reservations WHERE pool = $1 AND NOT served", pool
    )


async def test_wait_on_a_missing_pool_costs_a_few_calls_and_says_so(server: Running) -> None:
    before = lease_calls(server)
    done = await run(server, "lease", "--pool", "nosuch", "--wait", "8s", "--output", "json")
    after = lease_calls(server)
    assert done.returncode == 4, done
    err = json_error(done)
    assert err["code"] == "NOT_FOUND" and "nosuch" in err["message"], err
    uuid.UUID(err["reservation_id"])
    # inctl-style retries of every error, but paced: 1, 2, 4, 5 s apart.
    assert 2 <= after - before <= 8, f"{after - before} Lease calls in an 8 s wait"
    assert done.stdout == ""


async def test_given_up_wait_cancels_its_reservation_by_default(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    """At position 1 a forgotten reservation would take the next free VM and hold
    it for nobody until its reservation_ttl (5 m here)."""
    client = client_factory("grpclib", server.address)
    blocker = await lease_when_free(client, "solo")
    try:
        done = await run(server, "lease", "--pool", "solo", "--wait", "3s", "-o", "json")
        assert done.returncode == 3, done
        err = json_error(done)
        assert err["code"] == "RESOURCE_EXHAUSTED" and "position 1 of 1" in err["message"]
        assert err["reservation"] == "cancelled", err
        assert f"reservation {err['reservation_id']} cancelled" in err["message"]
        assert await queued(server, "solo") == []
        text = await run(server, "lease", "--pool", "solo", "--wait", "2s")
        assert text.returncode == 3 and "cancelled" in text.stderr.splitlines()[-1], text
        assert await queued(server, "solo") == []
    finally:
        await client.return_(blocker.instance)


async def test_given_up_wait_with_keep_reservation_prints_the_reservation_to_resume_with(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    blocker = await lease_when_free(client, "solo")
    before = lease_calls(server)
    done = await run(
        server, "lease", "--pool", "solo", "--wait", "3s", "--keep-reservation", "-o", "json"
    )
    assert done.returncode == 3, done
    err = json_error(done)
    assert err["code"] == "RESOURCE_EXHAUSTED" and "position 1 of 1" in err["message"]
    rid = err["reservation_id"]
    assert err["reservation"] == "kept"
    # The printed commands name the server this one reached: run them as printed.
    resume, cancel = (shlex.split(c) for c in re.findall(r"`([^`]*)`", err["message"]))
    assert resume[:2] == ["vmpool", "lease"] and resume[-2:] == ["--server", server.address]
    assert cancel[:4] == ["vmpool", "reservation", "cancel", rid], cancel
    assert f"--reservation-id {rid}" in err["message"]
    assert [str(r["id"]) for r in await queued(server, "solo")] == [rid]
    # The server-side wait paces it: the first call at once, then one that waits.
    assert lease_calls(server) - before <= 3
    # Its owner lists it; another tag sees none of it.
    mine = await run(server, "reservation", "list", "-o", "json")
    assert [(r["id"], r["pool"], r["position"]) for r in json.loads(mine.stdout)] == [
        (rid, "solo", 1)
    ], mine
    theirs = await run(server, "reservation", "list", "-o", "json", tag="someone-else")
    assert json.loads(theirs.stdout) == [], theirs
    # Resume, as printed, with the same place in the queue; the blocker's return serves it.
    async with cli_running(server, *resume[1:], "-o", "json", connect=False) as resumed:
        await client.return_(blocker.instance)
        await served_a_new_vm(client, resumed, blocker.instance)


async def test_reservation_cancel_withdraws_a_kept_reservation(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    blocker = await lease_when_free(client, "solo")
    try:
        args = ("lease", "--pool", "solo", "--wait", "2s", "--keep-reservation")
        kept = await run(server, *args)
        assert kept.returncode == 3, kept
        (rid,) = [str(r["id"]) for r in await queued(server, "solo")]
        listed = await run(server, "reservation", "list")
        assert rid in listed.stdout and "POSITION" in listed.stdout, listed
        refused = await run(server, "reservation", "cancel", rid, "-o", "json", tag="intruder")
        assert refused.returncode == 5, refused
        done = await run(server, "reservation", "cancel", rid)
        assert done.returncode == 0 and done.stdout.strip() == f"reservation {rid} cancelled"
        assert await queued(server, "solo") == []
        again = await run(server, "reservation", "cancel", rid, "-o", "json")
        assert again.returncode == 4 and json.loads(again.stderr)["code"] == "NOT_FOUND"
        assert (await run(server, "reservation", "list")).stdout.strip() == "(none)"
    finally:
        await client.return_(blocker.instance)


async def test_ctrl_c_cancels_the_reservation_and_the_next_client_gets_a_vm_at_once(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    blocker = await lease_when_free(client, "solo")
    async with cli_running(server, "lease", "--pool", "solo", "--wait", "2m", "-o", "json") as proc:
        await eventually(lambda: queued(server, "solo"), lambda q: len(q) == 1, 20, "queued")
        proc.send_signal(signal.SIGINT)
        code, out, text = await finished(proc, 20)
    assert code == 130, text
    assert "Traceback" not in text, text
    err = json.loads(text.strip().splitlines()[-1])
    assert err["code"] == "CANCELLED" and "cancelled" in err["message"], err
    assert out is None
    assert await queued(server, "solo") == [], "the reservation is withdrawn"
    # The VM that frees up goes to the next client, not to a reservation nobody
    # is waiting on (which would hold it for its 5 m TTL).
    await client.return_(blocker.instance)
    nxt = await lease_when_free(client, "solo", timeout=15)
    assert nxt.pool == "solo"
    await client.return_(nxt.instance)


async def test_ctrl_c_with_a_vm_set_aside_frees_it(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    """A reservation whose VM was set aside (its client dead or interrupted):
    CancelReservation hands the VM on at once."""
    client = client_factory("grpclib", server.address)
    blocker = await lease_when_free(client, "solo")
    rid = str(uuid.uuid4())
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
        await client.lease("solo", reservation_id=rid, service_tag="cli-wait")
    await client.return_(blocker.instance)
    await eventually(
        lambda: queued(server, "solo"), lambda q: q and q[0]["instance"], 20, "set aside"
    )
    host, port = server.address.rsplit(":", 1)
    channel = Channel(host, int(port))
    try:
        stub = adm.VmPoolExtensionServiceStub(channel)
        with pytest.raises(Exception, match="PERMISSION_DENIED"):
            await stub.cancel_reservation(
                adm.CancelReservationRequest(reservation_id=rid, service_tag="intruder")
            )
        reply = await stub.cancel_reservation(
            adm.CancelReservationRequest(reservation_id=rid, service_tag="cli-wait")
        )
        assert reply.outcome == "cancelled" and reply.pool == "solo" and reply.instance
        with pytest.raises(Exception, match="NOT_FOUND"):
            await stub.cancel_reservation(
                adm.CancelReservationRequest(reservation_id=rid, service_tag="cli-wait")
            )
    finally:
        channel.close()
    got = await client.lease("solo")  # at once: no retry needed
    assert got.instance == reply.instance
    await client.return_(got.instance)


async def test_expiry_is_recomputed_on_each_attempt(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    blocker = await lease_when_free(client, "solo")
    args = ("lease", "--pool", "solo", "--duration", "3s", "--wait", "1m", "-o", "json")
    async with cli_running(server, *args) as proc:
        await eventually(lambda: queued(server, "solo"), lambda q: len(q) == 1, 20, "queued")
        await asyncio.sleep(4)  # longer than --duration: an expiry computed once is past
        await client.return_(blocker.instance)
        got = await served_a_new_vm(client, proc, blocker.instance)
    expires = datetime.fromisoformat(got["expires"].replace("Z", "+00:00"))
    assert expires > datetime.now(UTC) - timedelta(seconds=1), got


async def test_wait_survives_a_server_restart(
    start_server: Callable[..., Awaitable[Running]],
    client_factory: Callable[[str, str], Client],
) -> None:
    running = await start_server([POOLS[0]], name="restarts")
    await running.wait_ready("solo", 1)
    client = client_factory("grpclib", running.address)
    blocker = await lease_when_free(client, "solo")
    async with cli_running(
        running, "lease", "--pool", "solo", "--wait", "2m", "-o", "json"
    ) as proc:
        await eventually(lambda: queued(running, "solo"), lambda q: len(q) == 1, 20, "queued")
        assert await asyncio.to_thread(running.proc.terminate) == 0
        await asyncio.sleep(2)  # the client sees refused connections meanwhile
        await asyncio.to_thread(running.proc.start)
        await client.return_(blocker.instance)
        await served_a_new_vm(client, proc, blocker.instance, timeout=60)


async def test_exit_codes_and_json_errors_by_outcome(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    blocker = await lease_when_free(client, "solo")
    try:
        outcomes = await asyncio.gather(
            run(server, "lease", "--pool", "solo", "-o", "json"),
            run(server, "get", "vmp-nope-nope", "-o", "json"),
            run(server, "return", blocker.instance, "-o", "json", tag="intruder"),
            run(server, "lease", "--duration", "soon", "-o", "json"),
            run(server, "lease", "--reservation-id", "not-a-uuid", "-o", "json"),
        )
    finally:
        await client.return_(blocker.instance)
    expected = [
        (3, "RESOURCE_EXHAUSTED"),
        (4, "NOT_FOUND"),
        (5, "PERMISSION_DENIED"),
        (2, "USAGE"),
        (2, "USAGE"),
    ]
    for done, (code, name) in zip(outcomes, expected, strict=True):
        assert done.returncode == code, (done.args, done.stderr)
        assert json_error(done)["code"] == name, done.stderr
    down = subprocess.run(
        [sys.executable, "-m", "vmpool", "ping", "--server", "127.0.0.1:1", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert down.returncode == 6 and json_error(down)["code"] == "UNAVAILABLE", down
    text = await run(server, "get", "vmp-nope-nope")
    assert text.returncode == 4 and text.stderr.startswith("vmpool: NOT_FOUND: "), text


async def test_cancel_of_a_served_reservation_releases_its_lease_only_when_asked(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    rid = str(uuid.uuid4())
    got = await lease_when_free(client, "wide", reservation_id=rid, service_tag="cli-wait")
    host, port = server.address.rsplit(":", 1)
    channel = Channel(host, int(port))
    try:
        stub = adm.VmPoolExtensionServiceStub(channel)
        with pytest.raises(Exception, match="FAILED_PRECONDITION"):
            await stub.cancel_reservation(
                adm.CancelReservationRequest(reservation_id=rid, service_tag="cli-wait")
            )
        reply = await stub.cancel_reservation(
            adm.CancelReservationRequest(
                reservation_id=rid, service_tag="cli-wait", release_lease=True
            )
        )
    finally:
        channel.close()
    assert (reply.outcome, reply.instance) == ("released", got.instance)
    with pytest.raises(Exception, match="NOT_FOUND"):
        await client.return_(got.instance, "cli-wait")


async def read_table(proc: asyncio.subprocess.Process) -> dict[str, dict[str, str]]:
    """One table of a piped `status --watch` (tables are separated by a blank line)."""
    assert proc.stdout is not None
    lines = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().rstrip("\n")
        if not line:
            break
        lines.append(line)
    heads = lines[0].split()
    return {r.split()[0]: dict(zip(heads, r.split(), strict=False)) for r in lines[1:]}


async def test_status_watch_prints_a_table_when_it_changes(
    server: Running, client_factory: Callable[[str, str], Client]
) -> None:
    client = client_factory("grpclib", server.address)
    await server.wait_ready("wide", 2)
    async with cli_running(server, "status", "--watch", "0.5s") as proc:
        first = await read_table(proc)
        assert first["wide"]["LEASED"] == "0" and "PROVISIONING" in first["wide"], first
        got = await lease_when_free(client, "wide")
        changed = await read_table(proc)  # only printed because something changed
        assert changed["wide"]["LEASED"] == "1", changed
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        code = await asyncio.wait_for(proc.wait(), 20)
        err = (await proc.stderr.read()).decode()
    assert code == 0 and "Traceback" not in err, err
    await client.return_(got.instance)
