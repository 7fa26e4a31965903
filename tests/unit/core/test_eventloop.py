"""vmpool serve's event loop: uvloop (a dependency), or asyncio's own on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from vmpool.core import eventloop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_serve_runs_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMPOOL_EVENT_LOOP", raising=False)
    assert eventloop.name() == "uvloop"
    assert issubclass(eventloop.run(_loop_type()), uvloop.Loop)


def test_the_plain_loop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMPOOL_EVENT_LOOP", "asyncio")
    assert eventloop.name() == "asyncio"
    assert not issubclass(eventloop.run(_loop_type()), uvloop.Loop)
