"""A PostgreSQL primary and a streaming standby on 127.0.0.1, built from the
binaries pgserver ships (initdb, pg_basebackup -R, pg_ctl), for the failover
scenarios: SIGKILL the primary, promote the standby, restart in place.

As root, every binary runs as pgserver's own user (``pgserver``), as pgserver
itself does: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from tests.server import free_port

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
    import pgserver  # noqa: F401 (sets up the binaries' permissions on import paths)
    from pgserver._commands import POSTGRES_BIN_PATH

USER = "pgserver"
DATABASE = "vmpool"

# Small and quick: this is about failover, not throughput. fsync off is safe
# here: a SIGKILL of PostgreSQL keeps the kernel's page cache.
SETTINGS = """
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 5
hot_standby = on
fsync = off
full_page_writes = off
wal_receiver_status_interval = 1s
# The standby reconnects 1 s after losing the primary (default 5 s): with
# synchronous replication, commits wait for it after a restart in place.
wal_retrieve_retry_interval = 1s
wal_sender_timeout = 10s
wal_receiver_timeout = 10s
log_min_messages = warning
max_connections = 100
"""


def _as_user() -> dict[str, object]:
    return {"user": USER} if os.geteuid() == 0 else {}


def _run(tool: str, *args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [str(POSTGRES_BIN_PATH / tool), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **_as_user(),  # type: ignore[arg-type]
    )
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)}: {done.stderr.strip()[-800:]}")
    return done.stdout


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            out.append(int(proc.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Node:
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.data = root / name
        self.sockets = root / f"{name}-sock"
        self.port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        _run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-w",
            "-t",
            "30",
            "-o",
            f"-p {self.port} -k {self.sockets}",
            "-l",
            str(self.data.parent / "owned" / f"{self.name}.log"),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(RuntimeError):
            _run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def postmaster(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def kill(self) -> None:
        """SIGKILL of the postmaster and every backend at once: the machine is gone."""
        postmaster = self.postmaster()
        if postmaster is None:
            return
        pids = [postmaster, *_children(postmaster)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.02)

    def promote(self) -> None:
        _run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "promote")

    def psql(self, sql: str, database: str = "postgres") -> str:
        return _run(
            "psql",
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        ).strip()


class PgCluster:
    """A primary and one standby (streaming, hot standby). ``synchronous``:
    the primary waits for the standby at every commit (``synchronous_standby_names``
    set once the standby streams: set earlier, commits would hang)."""

    def __init__(self, synchronous: bool = True) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vmpool-failover-pg-"))
        self.synchronous = synchronous
        self.primary = Node(self.root, "primary")
        self.standby = Node(self.root, "standby")

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> PgCluster:
        os.chmod(self.root, 0o755)
        for node in (self.primary, self.standby):
            self._own(node.sockets)
        self._own(self.root / "owned")  # the servers' logs
        self._own(self.primary.data)
        _run("initdb", "-D", str(self.primary.data), "-U", "postgres", "--auth=trust", "-E", "utf8")
        with (self.primary.data / "postgresql.conf").open("a") as conf:
            conf.write(SETTINGS)
        self.primary.start()
        self.primary.psql(f"CREATE DATABASE {DATABASE}")
        self._own(self.standby.data)
        _run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.standby.data),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
        self.standby.start()
        self._wait_streaming()
        if self.synchronous:
            self.primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
            self.primary.psql("SELECT pg_reload_conf()")
            self._wait_streaming(sync=True)
        return self

    def _wait_streaming(self, sync: bool = False, timeout: float = 30) -> None:
        want = "sync" if sync else "async"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.primary.psql("SELECT sync_state FROM pg_stat_replication")
            if state == want or (not sync and state in ("async", "sync", "potential")):
                return
            time.sleep(0.1)
        raise TimeoutError(f"standby not streaming ({want}) after {timeout:.0f}s")

    def url(self, *nodes: Node, attrs: str = "read-write") -> str:
        """A libpq multi-host URL over ``nodes`` (default: primary, standby)."""
        hosts = ",".join(n.address for n in (nodes or (self.primary, self.standby)))
        query = f"?target_session_attrs={attrs}" if attrs else ""
        return f"postgresql://postgres@{hosts}/{DATABASE}{query}"

    def stop(self) -> None:
        for node in (self.primary, self.standby):
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)
