"""The embedded PostgreSQL of the demo (pgserver), under ``data_dir/pg``.

pgserver shares one server among the processes listed in ``.handle_pids.json``
in the data directory and stops it when the last of them cleans up. A process
that cannot clean up (SIGKILL, a forced exit) stays listed: the server then
outlives every later run, clean shutdowns included. So a run adopts a leftover
server by dropping the listed processes that are gone, and the forced exit
stops the server itself."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("vmpool.store")

HOLDERS = ".handle_pids.json"  # pgserver's list of the processes using the server
POSTMASTER_PID = "postmaster.pid"


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. A zombie does not: it has exited and
    only waits for its parent to reap it (the postmaster's parent is PID 1,
    which in a container may reap late or never)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process, but there
    return not _exited(pid)


def _exited(pid: int) -> bool:
    """A zombie, by /proc (Linux); False where there is no /proc to ask."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return Path("/proc/self").exists()  # gone meanwhile, if /proc works at all
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def running_postmaster(pgdata: Path) -> int | None:
    """The pid of the server running in ``pgdata``, from postmaster.pid."""
    try:
        first = (pgdata / POSTMASTER_PID).read_text().split("\n", 1)[0]
        pid = int(first.strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def _read_holders(pgdata: Path) -> list[int]:
    try:
        raw = json.loads((pgdata / HOLDERS).read_text())
    except (OSError, ValueError):
        return []
    return [p for p in raw if isinstance(p, int)] if isinstance(raw, list) else []


def _write_holders(pgdata: Path, pids: list[int]) -> None:
    (pgdata / HOLDERS).write_text(json.dumps(pids))


def gone_within(pid: int, timeout: float) -> bool:
    """True once process ``pid`` is gone, False if it outlasts ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def stop_postmaster(pid: int, timeout: float) -> bool:
    """Fast shutdown (SIGINT: sessions ended, a checkpoint, no recovery needed on the
    next start); True once the server is gone, False if it outlasted ``timeout``."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return True
    return gone_within(pid, timeout)


class EmbeddedPostgres:
    """A PostgreSQL server under ``data_dir`` (pgserver), for demos and tests."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).resolve() / "pg"
        self._server: Any = None

    def start(self) -> str:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI).
            warnings.simplefilter("ignore")
            import pgserver  # lazy: the embedded PostgreSQL is for the demo only

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._adopt_leftover()
        get_server = pgserver.get_server  # type: ignore[attr-defined]
        self._server = get_server(self.data_dir, cleanup_mode="stop")
        uri: str = self._server.get_uri()
        return uri

    def _adopt_leftover(self) -> None:
        """Forget the listed users of the server that are gone, so this run is its
        last user and stops it when it ends. A server no one lists is adopted the
        same way (pgserver reuses a running one)."""
        holders = _read_holders(self.data_dir)
        live = [pid for pid in holders if pid != os.getpid() and alive(pid)]
        if live != holders:
            _write_holders(self.data_dir, live)
        leftover = running_postmaster(self.data_dir)
        if leftover is not None and not live:
            log.warning(
                "embedded postgres left running by an earlier run: adopted, "
                "stopped when this run ends",
                pid=leftover,
                data_dir=str(self.data_dir),
                gone=sorted(set(holders) - set(live)),
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Leave the users' list; the last user stops the server and returns
        once it is gone (bounded), so a run started right after finds none."""
        if self._server is None:
            return
        pid = running_postmaster(self.data_dir)
        self._server.cleanup()  # pg_ctl -w stop when no one else uses it
        self._server = None
        if pid is None or any(alive(p) for p in _read_holders(self.data_dir)):
            return  # someone else still uses it
        if not gone_within(pid, timeout):
            log.warning("embedded postgres still stopping at exit", pid=pid)

    def stop_now(self, timeout: float = 5.0) -> None:
        """For the forced exit (os._exit runs no atexit and no cleanup): leave the
        users' list and, if no one else uses the server, stop it (bounded)."""
        if self._server is None:
            return
        self._server = None
        others = [p for p in _read_holders(self.data_dir) if p != os.getpid() and alive(p)]
        _write_holders(self.data_dir, others)
        pid = running_postmaster(self.data_dir)
        if pid is None or others:
            return
        if not stop_postmaster(pid, timeout):
            log.warning("embedded postgres still stopping at exit", pid=pid)
