"""How the CLI ends: exit codes by outcome, and errors a script can read.

Exit codes (documented in README.md, "Exit codes"):

    0  ok
    1  anything else (an unexpected server error)
    2  usage or configuration mistake (bad flag, bad config, INVALID_ARGUMENT)
    3  no capacity, or still queued when --wait ran out (RESOURCE_EXHAUSTED)
    4  not found (NOT_FOUND: no such pool, instance or reservation)
    5  permission or authentication (PERMISSION_DENIED, UNAUTHENTICATED)
    6  server unavailable (UNAVAILABLE, unreachable, DEADLINE_EXCEEDED)
  130  interrupted (Ctrl-C)
  141  stdout closed by its reader (`vmpool ... | head`), as a tool killed by SIGPIPE
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from grpclib.const import Status

OK = 0
FAILURE = 1
USAGE = 2
NO_CAPACITY = 3
NOT_FOUND = 4
DENIED = 5
UNAVAILABLE = 6
INTERRUPTED = 130
BROKEN_PIPE = 141  # 128 + SIGPIPE

_BY_STATUS = {
    Status.INVALID_ARGUMENT: USAGE,
    Status.OUT_OF_RANGE: USAGE,
    Status.RESOURCE_EXHAUSTED: NO_CAPACITY,
    Status.NOT_FOUND: NOT_FOUND,
    Status.PERMISSION_DENIED: DENIED,
    Status.UNAUTHENTICATED: DENIED,
    Status.UNAVAILABLE: UNAVAILABLE,
    Status.DEADLINE_EXCEEDED: UNAVAILABLE,
    Status.CANCELLED: INTERRUPTED,
}


def exit_code(status: Status) -> int:
    """The exit code for a gRPC status that ended a command."""
    return _BY_STATUS.get(status, FAILURE)


@dataclass
class CliError(Exception):
    """A command's failure: ``code`` is a gRPC status name (or USAGE / FAILURE).
    ``show_code``: False for a local command's failure (serve, migrate, render),
    whose text line is the message alone (there is no status to name)."""

    code: str
    message: str
    exit: int
    reservation_id: str | None = None
    show_code: bool = True
    details: dict[str, str] | None = field(default=None, kw_only=True)  # more JSON keys

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def as_json(self) -> str:
        out: dict[str, str] = {"code": self.code, "message": self.message}
        if self.reservation_id:
            out["reservation_id"] = self.reservation_id
        out.update(self.details or {})
        return json.dumps(out)


def from_status(status: Status, message: str, reservation_id: str | None = None) -> CliError:
    return CliError(status.name, message, exit_code(status), reservation_id)


def usage(message: str) -> CliError:
    return CliError("USAGE", message, USAGE)


_LOCAL_CODES = {USAGE: "USAGE", UNAVAILABLE: "UNAVAILABLE", INTERRUPTED: "CANCELLED"}


def local_failure(message: str, exit: int = USAGE) -> CliError:
    """A local command's failure; its JSON ``code`` follows the exit code."""
    return CliError(_LOCAL_CODES.get(exit, "FAILURE"), message, exit, show_code=False)


def report(err: CliError, output: str) -> int:
    """Print ``err`` on stderr (one JSON object with ``--output json``; as text,
    each line of the message after ``vmpool:``); its exit code."""
    if output == "json":
        print(err.as_json(), file=sys.stderr, flush=True)
    else:
        # Named once: messages that already say which reservation get no suffix.
        rid = err.reservation_id
        rid = f" (reservation {rid})" if rid and rid not in err.message else ""
        code = f"{err.code}: " if err.show_code else ""
        for line in f"{code}{err.message}{rid}".splitlines():
            print(f"vmpool: {line}", file=sys.stderr, flush=True)
    return err.exit
