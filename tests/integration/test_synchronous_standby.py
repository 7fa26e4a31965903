"""database.require_synchronous_standby at start, against a PostgreSQL without
a standby (the test server): true stops start-up with one line naming the key
(exit 2), warn starts and says why, false does not ask."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import yaml

from tests.server import free_port
from vmpool.config.loading import parse_config
from vmpool.control.dbwatch import SynchronousStandbyMissing, check_synchronous_standby
from vmpool.store.db import create_pool
from vmpool.store.replication import sync_state, timeline


def serve(tmp_path: Path, db_url: str, required: object) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.yaml"
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": "",
        "database_url": db_url,
        "database": {"require_synchronous_standby": required},
    }
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "vmpool", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_a_required_synchronous_standby_that_is_missing_stops_start_up(
    tmp_path: Path, db_url: str
) -> None:
    done = serve(tmp_path, db_url, True)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if "require_synchronous_standby" in ln]
    assert "synchronous_standby_names is empty" in line, line


async def test_warn_and_false_start_without_a_synchronous_standby(db_url: str) -> None:
    db = await create_pool(db_url, min_size=1, max_size=1)
    try:
        warn = parse_config({"database": {"require_synchronous_standby": "warn"}}).database
        await check_synchronous_standby(db, warn)  # logs, does not raise
        off = parse_config({}).database
        await check_synchronous_standby(db, off)
        with pytest.raises(SynchronousStandbyMissing, match="require_synchronous_standby"):
            await check_synchronous_standby(
                db, parse_config({"database": {"require_synchronous_standby": True}}).database
            )
    finally:
        db.terminate()


async def test_the_replication_checks_need_no_privilege(db_url: str) -> None:
    """A role that is not superuser nor pg_monitor (an application's, as
    CloudNativePG's `app` user) can read the timeline and the sync settings."""
    admin = await asyncpg.connect(db_url)
    try:
        await admin.execute("DROP ROLE IF EXISTS vmpool_app")
        await admin.execute("CREATE ROLE vmpool_app LOGIN")
        app_url = db_url.replace("postgres@", "vmpool_app@", 1)
        conn = await asyncpg.connect(app_url)
        try:
            assert await timeline(conn) >= 1
            state = await sync_state(conn)
            assert state.synchronous is False and state.standbys == 0
        finally:
            await conn.close()
    finally:
        await admin.execute("DROP ROLE IF EXISTS vmpool_app")
        await admin.close()
