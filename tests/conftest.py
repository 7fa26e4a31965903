from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.e2e.grpcio_stack import GrpcioModules, compile_lease_api
from tests.pg import TestPostgres
from vmpool.store.db import Database


@pytest.fixture(scope="session")
def grpcio_modules(tmp_path_factory: pytest.TempPathFactory) -> GrpcioModules:
    """The lease API compiled with grpcio-tools: protobuf's own (upb) messages."""
    return compile_lease_api(tmp_path_factory.mktemp("grpcio-gen"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[TestPostgres]:
    pg = TestPostgres()
    asyncio.run(pg.setup_template())
    yield pg
    pg.stop()


@pytest.fixture
async def db_url(postgres: TestPostgres) -> str:
    return await postgres.fresh()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    from vmpool.store.db import create_pool

    pool = await create_pool(db_url, min_size=1, max_size=60)
    yield pool
    await pool.close()


REPO = Path(__file__).resolve().parents[1]
OURS = (str(REPO / "vmpool"), str(REPO / "tests"))


def _ours(task: asyncio.Task[object]) -> bool:
    """A task running our code (vmpool, tests), not a library's own (an HTTP
    server's connection handler belongs to the fixture that runs the server)."""
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.startswith(OURS)


def leftover_tasks(
    before: set[asyncio.Task[object]], current: asyncio.Task[object] | None
) -> list[asyncio.Task[object]]:
    """Tasks of ours created since ``before`` that are still running: tasks that
    longer-scoped fixtures started before the test are in ``before`` and are
    not the test's; tasks a module fixture keeps on purpose are named "keep:..."."""
    return [
        t
        for t in asyncio.all_tasks() - before
        if t is not current and not t.done() and not t.get_name().startswith("keep:") and _ours(t)
    ]


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail every test that leaves tasks of ours running on the shared loop."""
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0)
    left = leftover_tasks(before, asyncio.current_task())
    for t in left:
        t.cancel()
    assert not left, f"test left tasks running: {[(t.get_name(), t.get_coro()) for t in left]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Every skipped test and why, so that a skip is never silent."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(f"skipped: {len(skipped)}, and why")
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        terminalreporter.line(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}")
