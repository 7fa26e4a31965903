"""The leftover-task guard (tests/conftest.py) must catch a test that leaks a task."""

from __future__ import annotations

import asyncio

from tests.conftest import leftover_tasks


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_a_task_started_and_left_running_is_reported() -> None:
    before = set(asyncio.all_tasks())
    leaked = asyncio.create_task(_forever())
    try:
        assert leftover_tasks(before, asyncio.current_task()) == [leaked]
    finally:
        leaked.cancel()
        await asyncio.gather(leaked, return_exceptions=True)
    assert leftover_tasks(before, asyncio.current_task()) == []


async def test_tasks_started_before_the_test_or_kept_on_purpose_are_not_the_tests() -> None:
    older = asyncio.create_task(_forever())
    before = set(asyncio.all_tasks())
    kept = asyncio.create_task(_forever(), name="keep:fixture")
    try:
        assert leftover_tasks(before, asyncio.current_task()) == []
    finally:
        for t in (older, kept):
            t.cancel()
        await asyncio.gather(older, kept, return_exceptions=True)
