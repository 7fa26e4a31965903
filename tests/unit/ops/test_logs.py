"""Log lines are whole: structlog records and standard-library records (asyncpg,
aiohttp), from the serving thread and the background thread at once, never
share a line, also with PYTHONUNBUFFERED=1; a closed stdout drops the logs and
the process carries on. Each case runs in a real process with stdout a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.server import json_records

# Two threads, each logging through structlog and through the standard library,
# with lines long enough to take several writes each.
CONCURRENT = textwrap.dedent(
    """
    import logging, threading
    import structlog
    from vmpool.ops import logs

    logs.setup("info", json=True)
    log = structlog.get_logger("vmpool.test")
    lib = logging.getLogger("asyncpg.pool")
    go = threading.Event()

    def hammer(name):
        go.wait()
        for i in range(400):
            log.info("structlog line", thread=name, i=i, pad="s" * (i * 37 % 9000))
            lib.warning("stdlib line %s %d %s", name, i, "l" * (i * 53 % 9000))

    threads = [threading.Thread(target=hammer, args=(n,)) for n in ("serving", "background")]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    """
)


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_concurrent_lines_from_two_threads_and_two_loggers_are_whole(unbuffered: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    if not unbuffered:
        env.pop("PYTHONUNBUFFERED")
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = done.stdout.decode().splitlines()
    records = json_records(lines)
    events = [r["event"] for r in records]
    assert events.count("structlog line") == 800
    assert sum(e.startswith("stdlib line") for e in events) == 800


CLOSED = textwrap.dedent(
    """
    import logging, sys, time
    import structlog
    from vmpool.ops import logs

    logs.setup("info", json=True)
    log = structlog.get_logger("vmpool.test")
    log.info("first")
    time.sleep(0.5)  # the reader has gone by now
    for i in range(2000):
        log.info("after the reader left", i=i)
        logging.getLogger("aiohttp.access").warning("and a library %d", i)
    sys.stderr.write("still running\\n")
    """
)


def test_a_closed_stdout_drops_the_logs_and_the_process_carries_on() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLOSED],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # as `| head -1` does
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0, err[-2000:]
    assert json.loads(first)["event"] == "first"
    assert "still running" in err
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]


RECONNECT = textwrap.dedent(
    """
    import asyncio, logging
    import asyncpg
    from vmpool.ops import logs

    logs.setup("info", json=True)

    async def main():
        # Nothing listens on port 1: every reconnect of the pool's floor fails.
        try:
            pool = await asyncpg.create_pool("postgresql://u@127.0.0.1:1/db", min_size=1)
        except OSError as err:
            # As asyncpg's pool logs a failed reconnect while PostgreSQL is down.
            try:
                raise err
            except OSError:
                logging.getLogger("asyncpg.pool").warning(
                    "Failed to restore the pool connection floor; retrying", exc_info=True
                )

    asyncio.run(main())
    """
)


def test_the_database_pool_reconnect_warning_is_one_line_without_a_traceback() -> None:
    """PostgreSQL down: asyncpg logs each failed reconnect with exc_info; the log
    keeps the error on the line, not a traceback."""
    done = subprocess.run(
        [sys.executable, "-c", RECONNECT], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    records = json_records(done.stdout.decode().splitlines())
    assert [r["logger"] for r in records] == ["asyncpg.pool"]
    assert "Traceback" not in done.stdout.decode()
    assert "exception" not in records[0]
    assert "Connect" in records[0]["error"] or "refused" in records[0]["error"]
