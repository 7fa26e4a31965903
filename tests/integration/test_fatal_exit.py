"""A server that stops by itself says so: `serve` raises FatalError (and
`vmpool serve` exits non-zero), where a requested stop returns normally."""

from __future__ import annotations

import asyncio

import pytest

from vmpool.app import FatalError, serve
from vmpool.cli import serve as cli_server
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


def test_vmpool_serve_exits_non_zero_after_a_fatal_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def stopped(*args: object, **kwargs: object) -> None:
        raise FatalError("background: RuntimeError('boom')")

    monkeypatch.setattr("vmpool.app.serve", stopped)
    monkeypatch.setattr("vmpool.ops.logs.setup", lambda *a, **k: None)
    monkeypatch.setattr(cli_server, "_database_url", lambda config: ("postgresql://x/y", None))
    monkeypatch.setattr(cli_server, "_config_or_exit", lambda path: parse_config(CONFIG))

    class Args:
        config = None
        listen = None
        metrics_listen = None
        role = "all"
        reuse_port = False

    assert cli_server.cmd_serve(Args()) != 0  # type: ignore[arg-type]
    assert "fatal error" in capsys.readouterr().err
