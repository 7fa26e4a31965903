"""The demo's embedded PostgreSQL (`vmpool serve` with no config) never outlives
vmpool: not after a double Ctrl-C (the forced exit), and a server left by a run
that was killed is adopted by the next run and stopped when that one ends.

Real processes: `vmpool serve` (the demo, on free ports) in a temporary
directory, its PostgreSQL found through .vmpool/pg/postmaster.pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import free_port, wait_for_port
from vmpool.store.embedded import alive, gone_within, running_postmaster, stop_postmaster

pytestmark = pytest.mark.timeout(300)


class Demo:
    """`vmpool serve` with no --config in ``cwd`` (its data_dir is ./.vmpool)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.pgdata = cwd / ".vmpool" / "pg"
        self.runs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        port = free_port()
        log = (self.cwd / f"demo{len(self.runs)}.log").open("ab")
        listen = ["--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{free_port()}"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmpool", "serve", *listen],
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "VMPOOL_DATABASE_URL"},
        )
        log.close()
        self.runs.append(proc)
        wait_for_port(port, 120, proc)  # initdb is slow on a busy machine
        return proc

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.cwd.glob("demo*.log")))

    def postgres(self) -> int:
        pid = running_postmaster(self.pgdata)
        assert pid is not None, "the demo's PostgreSQL is not running"
        return pid


@pytest.fixture
def demo() -> Iterator[Demo]:
    # Not under pytest's tmp_path: pytest makes its root 0700 again whenever a
    # session starts, and the server runs as its own user when we are root.
    made = Demo(Path(tempfile.mkdtemp(prefix="vmpool-demo-")))
    yield made
    for proc in made.runs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    leftover = running_postmaster(made.pgdata)
    if leftover is not None:  # the test failed: do not leave a server behind
        stop_postmaster(leftover, 10)
    shutil.rmtree(made.cwd, ignore_errors=True)


def test_an_exited_process_not_yet_reaped_is_not_alive() -> None:
    # The stopped postmaster's parent is PID 1, which may reap it late (or, in
    # a container without an init, never): a zombie is not a running server.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert not alive(child.pid)
        assert gone_within(child.pid, 0)
    finally:
        child.wait(10)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert alive(running.pid)
    finally:
        running.kill()
        running.wait(10)


def test_a_second_signal_stops_the_embedded_postgres_too(demo: Demo) -> None:
    proc = demo.start()
    postgres = demo.postgres()
    # A second signal while the first is being handled. An idle demo shuts down
    # in a few milliseconds, so one sent 20 ms later may find it gone (a clean
    # exit, testing nothing), and the kernel merges two pending SIGINTs into one:
    # the second is a SIGTERM sent at once (stop_on_signals treats both alike).
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 1, demo.log()
    assert "second signal: exiting at once" in demo.log()
    assert gone_within(postgres, 5), "the forced exit left the embedded PostgreSQL running"


def test_a_killed_runs_postgres_is_adopted_and_stopped_by_the_next_clean_exit(
    demo: Demo,
) -> None:
    first = demo.start()
    orphan = demo.postgres()
    first.kill()  # no clean-up at all
    first.wait(10)
    assert alive(orphan)
    second = demo.start()
    assert demo.postgres() == orphan  # reused, not a second server on one data dir
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    assert gone_within(orphan, 5), "a clean exit left the adopted PostgreSQL running"
    assert "embedded postgres left running by an earlier run: adopted" in demo.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_clean_exit_returns_only_once_the_embedded_postgres_is_gone(
    demo: Demo, sig: signal.Signals
) -> None:
    # Run again right away (Ctrl-C, up-arrow, Enter): the new run must not find
    # a server still stopping in its data directory.
    proc = demo.start()
    postgres = demo.postgres()
    proc.send_signal(sig)
    assert proc.wait(60) == 0
    assert not alive(postgres), "vmpool exited while its PostgreSQL was still running"
    again = demo.start()
    assert demo.postgres() != postgres
    again.send_signal(sig)
    assert again.wait(60) == 0
    assert running_postmaster(demo.pgdata) is None
    assert "Traceback" not in demo.log()
