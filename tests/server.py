"""Start `vmpool serve` as a real process for end-to-end tests, benchmarks and chaos runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


def json_records(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """Each log line as its JSON record; AssertionError naming the first line that
    is not exactly one record (two records on a line, or a record cut in two)."""
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(
                f"log line {number} is not one JSON record: {line[:300]!r}"
            ) from None
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


class ServerProcess:
    """`vmpool serve --config FILE` in a subprocess, its log in ``log_path``."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        database_url: str | None = None,
        port: int | None = None,
        metrics_port: int | None = None,
        name: str = "server",
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        """``args``: more flags for `vmpool serve` (``--role reconciler`` listens
        on no gRPC port: start() then waits for its metrics port)."""
        self.args = args
        self.port = port or free_port()
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.config = {
            "listen": f"127.0.0.1:{self.port}",
            "metrics_listen": f"127.0.0.1:{self.metrics_port}" if self.metrics_port else "",
            "data_dir": str(workdir / ".vmpool"),
            **config,
        }
        if database_url:
            self.config["database_url"] = database_url
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / f"{name}.log"
        self.workdir = workdir
        self.env = {**os.environ, **(env or {})}
        self.env.pop("VMPOOL_DATABASE_URL", None)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, *, stdout: int | None = None) -> ServerProcess:
        """``stdout``: where the log lines go (e.g. subprocess.PIPE); by default,
        with stderr, to ``log_path``."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmpool",
                "serve",
                "--config",
                str(self.config_path),
                *self.args,
            ],
            stdout=log if stdout is None else stdout,
            stderr=subprocess.STDOUT if stdout is None else log,
            cwd=self.workdir,
            env=self.env,
        )
        log.close()
        reconciler_only = "reconciler" in self.args and "--role" in self.args
        wait_for_port(self.metrics_port if reconciler_only else self.port, timeout, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, nothing cleaned up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
