"""`vmpool lease --wait`: one reservation id, retried until a VM is ours or time runs out.

Like inctl's loop, every error is retried except PERMISSION_DENIED and
UNAUTHENTICATED; unlike it, each retry waits server-side (x-vmpool-wait) when the
server can, and otherwise backs off, so a typo or a server restart costs a call
every few seconds, not hundreds a second. The expiry is recomputed per attempt.
Ctrl-C withdraws the reservation (CancelReservation) so its place and any VM set
aside for it go to the next client at once; so does giving up when --wait runs
out, unless --keep-reservation (then the resume and cancel commands are printed).
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TextIO

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from vmpool.cli import errors as cli_errors
from vmpool.cli.connection import Connection
from vmpool.cli.errors import CliError
from vmpool.core.backoff import backoff_ceiling
from vmpool.core.durations import format_duration
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.proto.vmpool.admin import v1 as adm

WAIT_HEADER = "x-vmpool-wait"
SERVER_WAIT = 20.0  # seconds of server-side wait per Lease call (the server caps at 60)
MIN_GAP = 1.0  # never two Lease calls closer than this
MAX_BACKOFF = 5.0  # between calls that fail at once (typo, server down)
PLAIN_EVERY = 30.0  # piped: a line at least this often even when nothing changed
FINAL = (Status.PERMISSION_DENIED, Status.UNAUTHENTICATED)
CANCEL_TIMEOUT = 5.0

_QUEUED = re.compile(r"queued at position (\d+) of (\d+) in pool \"([^\"]*)\"")


@dataclass(frozen=True)
class Place:
    position: int
    length: int
    pool: str


def queue_place(message: str) -> Place | None:
    """The queue position a RESOURCE_EXHAUSTED message gives, if it gives one."""
    m = _QUEUED.search(message)
    return Place(int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def retry_delay(failures_in_a_row: int, call_seconds: float) -> float:
    """Seconds to sleep before the next call, after one that did not get a VM.

    A call that waited server-side has paced itself: go again at once (but never
    sooner than MIN_GAP after its start). Calls that fail at once back off
    1, 2, 4 s... up to MAX_BACKOFF.
    """
    backoff = backoff_ceiling(failures_in_a_row, MIN_GAP, MAX_BACKOFF) if failures_in_a_row else 0.0
    return max(backoff, MIN_GAP - call_seconds, 0.0)


class Progress:
    """The wait as people see it: on a terminal one line redrawn in place; piped,
    a plain line when something changed or every PLAIN_EVERY seconds; with
    ``--output json``, those lines are JSON objects (``"event": "waiting"``)."""

    def __init__(
        self, out: TextIO, wait: float, clock: Callable[[], float], *, as_json: bool, rid: str
    ) -> None:
        self._out = out
        self._json = as_json
        self._tty = out.isatty() and not as_json
        self._wait = wait
        self._clock = clock
        self._rid = rid
        self._start = clock()
        self._state = "starting"
        self._place: Place | None = None
        self._last_text = ""
        self._last_at = self._start  # nothing to show until the first answer
        self._drawn = False

    def set(self, state: str, place: Place | None = None) -> None:
        self._state, self._place = state, place
        self.show()

    def line(self) -> str:
        elapsed = self._clock() - self._start
        left = max(self._wait - elapsed, 0.0)
        if self._json:
            out: dict[str, object] = {
                "event": "waiting",
                "state": self._state,
                "reservation_id": self._rid,
                "elapsed_seconds": round(elapsed),
                "remaining_seconds": round(left),
            }
            if self._place:
                out |= {
                    "position": self._place.position,
                    "length": self._place.length,
                    "pool": self._place.pool,
                }
            return json.dumps(out)
        return (
            f"waiting: {self._state}; waited {format_duration(timedelta(seconds=round(elapsed)))}"
            f", {format_duration(timedelta(seconds=round(left)))} left"
        )

    def show(self) -> None:
        now = self._clock()
        if self._tty:
            self._out.write("\r\x1b[2K" + self.line())
            self._drawn = True
        elif self._state != self._last_text or now - self._last_at >= PLAIN_EVERY:
            self._out.write(self.line() + "\n")
            self._last_text, self._last_at = self._state, now
        self._out.flush()

    def tick(self) -> None:
        """Redraw the terminal line (elapsed and remaining move); piped: only if due."""
        if self._state == "starting":
            return
        if self._tty or self._clock() - self._last_at >= PLAIN_EVERY:
            self.show()

    def done(self) -> None:
        if self._drawn:
            self._out.write("\r\x1b[2K")
            self._out.flush()
            self._drawn = False


async def _ticker(progress: Progress) -> None:
    while True:
        await asyncio.sleep(1.0)
        progress.tick()


def _describe(err: BaseException) -> tuple[str, str]:
    if isinstance(err, GRPCError):
        return err.status.name, err.message or ""
    return "UNAVAILABLE", f"cannot reach the server: {err or type(err).__name__}"


async def lease_with_wait(
    conn: Connection,
    *,
    pool: str,
    service_tag: str,
    duration: timedelta | None,
    reservation_id: str | None,
    wait: timedelta,
    progress: TextIO,
    progress_json: bool = False,
    keep_reservation: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> api.Lease:
    """Lease, waiting up to ``wait`` in the queue with ``reservation_id``. Giving
    up withdraws the reservation unless ``keep_reservation``."""

    def request() -> api.LeaseRequest:
        req = api.LeaseRequest(pool=pool, service_tag=service_tag, reservation_id=reservation_id)
        if duration is not None:
            req.expires = datetime.now(UTC) + duration  # per attempt, as inctl does
        return req

    if not wait:
        reply = await conn.lease.lease(
            request(), timeout=conn.timeout, metadata=conn.call_metadata()
        )
        return reply.lease
    assert reservation_id is not None
    deadline = clock() + wait.total_seconds()
    shown = Progress(
        progress, wait.total_seconds(), clock, as_json=progress_json, rid=reservation_id
    )
    ticker = asyncio.ensure_future(_ticker(shown))
    try:
        # A server-side wait longer than the lease asked for would send an expiry
        # that has passed by the time a VM is set aside.
        longest = SERVER_WAIT if duration is None else max(duration.total_seconds() - 1, 1)
        return await _wait_loop(
            conn, request, reservation_id, deadline, min(SERVER_WAIT, longest), shown, clock
        )
    except asyncio.CancelledError:
        shown.done()
        what = await withdraw(conn, reservation_id, service_tag)
        raise CliError(
            "CANCELLED", f"interrupted: {what}", cli_errors.INTERRUPTED, reservation_id
        ) from None
    except GaveUp as gave_up:
        shown.done()
        if keep_reservation:
            gave_up.message += "; " + kept_hint(
                reservation_id, service_tag, pool, gave_up.pool, conn.flags
            )
            gave_up.details = {"reservation": "kept"}
        else:
            gave_up.message += "; " + await withdraw(conn, reservation_id, service_tag)
            gave_up.details = {"reservation": "cancelled"}
        raise
    finally:
        ticker.cancel()
        shown.done()


async def _wait_loop(
    conn: Connection,
    request: Callable[[], api.LeaseRequest],
    rid: str,
    deadline: float,
    server_wait: float,
    shown: Progress,
    clock: Callable[[], float],
) -> api.Lease:
    failures = 0
    first = True
    while True:
        # The first call answers at once, so the queue position shows right away;
        # the later ones wait server-side until an instance is set aside.
        remaining = deadline - clock()
        step = 0.0 if first else max(0.0, min(server_wait, remaining))
        first = False
        metadata = {WAIT_HEADER: f"{step:.0f}s"} if step >= 1 else None
        started = clock()
        try:
            reply = await conn.lease.lease(
                request(), timeout=conn.timeout + step, metadata=conn.call_metadata(metadata)
            )
            return reply.lease
        except (GRPCError, OSError, StreamTerminatedError, TimeoutError) as err:
            code, message = _describe(err)
            if isinstance(err, GRPCError) and err.status in FINAL:
                raise cli_errors.from_status(err.status, message, rid) from None
            took = clock() - started
            place = queue_place(message) if code == "RESOURCE_EXHAUSTED" else None
            if place is not None:
                shown.set(
                    f'queued at position {place.position} of {place.length} in pool "{place.pool}"',
                    place,
                )
                # Paced by the server's wait: go again at once (MIN_GAP apart).
                failures = 0 if step >= 1 and took >= min(step, 1.0) else failures + 1
            else:
                shown.set(f"{code}: {message}; retrying")
                failures += 1
            delay = retry_delay(failures, took)
            if clock() + delay >= deadline:
                raise GaveUp(
                    code,
                    f"gave up after --wait: {message}",
                    cli_errors.NO_CAPACITY if place else _exit_for(code),
                    rid,
                    pool=place.pool if place else "",
                ) from None
            if delay:
                await asyncio.sleep(delay)


def _exit_for(code: str) -> int:
    return cli_errors.exit_code(Status[code])


@dataclass
class GaveUp(CliError):
    """--wait ran out with the reservation still queued (or the server failing)."""

    pool: str = ""  # the reservation's pool, when the queue said


def kept_hint(
    rid: str, tag: str, asked_pool: str, queued_pool: str, connection: tuple[str, ...] = ()
) -> str:
    """How to resume or withdraw a reservation left queued (--keep-reservation):
    commands that reach the same server as this one."""
    pool = asked_pool or queued_pool
    common = ["--service-tag", tag, *connection]
    resume = ["vmpool", "lease", *(["--pool", pool] if pool else []), "--wait", "20m"]
    resume += ["--reservation-id", rid, *common]
    cancel = ["vmpool", "reservation", "cancel", rid, *common]
    return (
        f"reservation {rid} kept in the queue until its reservation_ttl: resume with "
        f"`{shlex.join(resume)}`, withdraw with `{shlex.join(cancel)}`"
    )


async def cancel_reservation(conn: Connection, rid: str, tag: str) -> str:
    """CancelReservation, ending a lease granted for it that nobody saw; what
    happened. Errors are the caller's to handle."""
    reply = await conn.extension.cancel_reservation(
        adm.CancelReservationRequest(reservation_id=rid, service_tag=tag, release_lease=True),
        timeout=CANCEL_TIMEOUT,
        metadata=conn.call_metadata(),
    )
    if reply.outcome == "cancelled":
        return f"reservation {rid} cancelled"
    return f"reservation {rid} cancelled and its lease of {reply.instance} ended"


async def withdraw(conn: Connection, rid: str, tag: str) -> str:
    """Cancel the reservation as the command ends; what happened, for its message."""
    try:
        what = await cancel_reservation(conn, rid, tag)
    except GRPCError as err:
        if err.status == Status.NOT_FOUND:
            what = f"reservation {rid} was not queued"
        else:
            what = f"could not cancel reservation {rid} ({err.status.name}: {err.message}); it expires by itself"
    except (OSError, StreamTerminatedError, TimeoutError) as err:
        what = f"could not cancel reservation {rid} ({err or type(err).__name__}); it expires by itself"
    return what
