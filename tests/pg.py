"""A real PostgreSQL for tests: pgserver (embedded), or VMPOOL_TEST_DATABASE_URL.

The schema is migrated once into a template database; every test gets a
fresh copy (CREATE DATABASE ... TEMPLATE), which takes a few milliseconds.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import urllib.parse
import warnings
from typing import Any

import asyncpg

from vmpool.store.db import migrate

TEMPLATE = "vmpool_test_template"
_counter = itertools.count()


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


class TestPostgres:
    __test__ = False  # not a test class

    def __init__(self) -> None:
        self._server: Any = None
        self.url = os.environ.get("VMPOOL_TEST_DATABASE_URL", "")
        if not self.url:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver
            self._dir = tempfile.mkdtemp(prefix="vmpool-test-pg-")
            self._server = pgserver.get_server(self._dir, cleanup_mode="delete")
            self.url = self._server.get_uri()

    async def setup_template(self) -> None:
        admin = await asyncpg.connect(self.url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(with_database(self.url, TEMPLATE))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def fresh(self) -> str:
        """A new database with the schema applied; returns its URL."""
        return await self._create(f"vmpool_t{os.getpid()}_{next(_counter)}", TEMPLATE)

    async def empty(self) -> str:
        """A new database without the schema."""
        return await self._create(f"vmpool_e{os.getpid()}_{next(_counter)}", None)

    async def _create(self, name: str, template: str | None) -> str:
        admin = await asyncpg.connect(self.url)
        try:
            clause = f" TEMPLATE {template}" if template else ""
            await admin.execute(f"CREATE DATABASE {name}{clause}")
        finally:
            await admin.close()
        return with_database(self.url, name)

    def stop(self) -> None:
        if self._server is not None:
            # The data is deleted next, so skip the shutdown checkpoint: after
            # hundreds of test databases it took over a minute on a loaded
            # machine, inside the last test's timeout.
            from pgserver._commands import pg_ctl

            with contextlib.suppress(Exception):  # already stopped: cleanup copes
                pg_ctl(
                    ["-w", "stop", "-m", "immediate"],
                    pgdata=self._server.pgdata,
                    user=self._server.system_user,
                    timeout=60,
                )
            self._server.cleanup()
