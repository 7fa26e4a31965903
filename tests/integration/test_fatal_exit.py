"""A server that stops by itself says so: `serve` raises FatalError (and
`vmpool serve` exits non-zero), where a requested stop returns normally."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vmpool.app import FatalError, serve
from vmpool.cli import errors as cli_errors
from vmpool.config.loading import parse_config
from vmpool.control.background import Background

CONFIG = {
    "listen": "127.0.0.1:0",
    "metrics_listen": "",
    "pools": [{"name": "p", "min_ready": 0, "max_size": 1}],
}


async def test_a_crash_of_the_background_work_stops_the_server_with_an_error(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crash(self: Background, *args: object) -> None:
        raise RuntimeError("a bug in the background work")

    monkeypatch.setattr(Background, "_work", crash)
    with pytest.raises(FatalError, match="a bug in the background work"):
        await asyncio.wait_for(serve(parse_config(CONFIG), db_url), 60)
    with pytest.raises(FatalError, match="a bug in the background work"):
        await asyncio.wait_for(serve(parse_config(CONFIG), db_url, role="reconciler"), 60)


# The fault is the only thing patched: the command line, config file, database,
# server and exit path are the real ones, in a process of their own.
CRASHING_VMPOOL = """
import sys
from vmpool.cli import main
from vmpool.control.background import Background

async def crash(self, *args):
    raise RuntimeError("a bug in the background work")

Background._work = crash
main(sys.argv[1:])
"""


@pytest.mark.parametrize("output", ["text", "json"])
def test_vmpool_serve_exits_non_zero_after_a_fatal_error(
    db_url: str, tmp_path: Path, output: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "database_url": db_url}))
    argv = ["serve", "--config", str(path), "--output", output]
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_VMPOOL, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "VMPOOL_DATABASE_URL"},
    )
    assert result.returncode == cli_errors.FAILURE, result.stderr
    reason = "RuntimeError('a bug in the background work')"
    last = result.stderr.splitlines()[-1]
    if output == "json":
        assert json.loads(last) == {
            "code": "FAILURE",
            "message": f"stopped after a fatal error: {reason}",
        }
    else:
        assert last == f"vmpool: stopped after a fatal error: {reason}"
