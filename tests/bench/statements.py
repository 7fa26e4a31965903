"""Statements per Lease+Return cycle: what `vmpool serve` sends PostgreSQL.

    python -m tests.bench.statements [--concurrency 1] [--seconds 3] [--checkout DIR]

`vmpool serve` as the versus phase runs it (tests/bench/versus.py: fake
provider, boot 0, 200 ms reconcile interval, pool 400/1000/1000) on its own
pgserver with `log_statement = 'all'` on its database; the grpc-go generator
drives Lease->Return for a few seconds, and every statement PostgreSQL logged
between two markers is counted by its first words, per cycle. The reconciler's
statements are in the count: its passes, the refill of each returned VM, the
leader's renewals. Needs Go and the embedded PostgreSQL (pgserver).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import tempfile
import urllib.parse
from pathlib import Path

import asyncpg

from tests.bench import versus
from tests.golang import build_go_client, go_available
from tests.pg import TestPostgres
from tests.server import ServerProcess

START, END = "vmpool-bench-statements-start", "vmpool-bench-statements-end"
_LOGGED = re.compile(r"LOG:  (?:execute [^:]*|statement): (.*)", re.S)


def classify(log: str) -> collections.Counter[str]:
    """The statements logged between the markers, by their first 90 characters
    (whitespace folded; BEGIN and COMMIT count as statements: each is a round trip)."""
    counts: collections.Counter[str] = collections.Counter()
    inside = False
    for entry in re.split(r"\n(?=\S)", log):
        m = _LOGGED.search(entry)
        if m is None:
            continue
        text = " ".join(m.group(1).split())
        if START in text:
            inside = True
        elif END in text:
            break
        elif inside:
            counts[text[:90]] += 1
    return counts


async def measure(concurrency: float, seconds: float, checkout: Path | None = None) -> None:
    pg = TestPostgres()
    log_file = Path(getattr(pg, "_dir", "")) / "log"
    if not log_file.exists():
        raise SystemExit("needs the embedded PostgreSQL (pgserver), not VMPOOL_TEST_DATABASE_URL")
    work = Path(tempfile.mkdtemp(prefix="vmpool-statements-"))
    try:
        await pg.setup_template()
        url = await pg.fresh()
        name = urllib.parse.urlsplit(url).path.lstrip("/")
        admin = await asyncpg.connect(url)
        await admin.execute(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
        await admin.execute(
            "SET log_statement = 'all'"
        )  # for the markers (new sessions: the line above)
        gen = versus.GoGenerator(await asyncio.to_thread(build_go_client, work / "go"))
        env = {"PYTHONPATH": str(checkout.resolve())} if checkout is not None else None
        server = ServerProcess(
            versus.VMPOOL_CONFIG,
            work / "vmpool",
            database_url=url,
            metrics_port=0,
            name="vmpool",
            env=env,
        )
        await asyncio.to_thread(server.start)
        try:
            await versus.ready(url, 400)
            await asyncio.sleep(1.0)  # start-up's refill is over
            await admin.execute(f"SELECT '{START}'")
            result = await gen.run(
                op="lease",
                address=server.address,
                concurrency=int(concurrency),
                channels=versus.CHANNELS,
                duration=seconds,
                warmup=0.0,
                pool=versus.POOL,
            )
            await admin.execute(f"SELECT '{END}'")
        finally:
            server.__exit__()
            await admin.close()
        counts = classify(log_file.read_text(errors="replace"))
        cycles = result["calls_per_s"] * seconds / 2
        total = sum(counts.values())
        print(
            f"c={int(concurrency)}: {result['calls_per_s']} Lease+Return RPC/s for {seconds} s "
            f"(errors {result['errors']}); {total} statements, "
            f"{total / cycles:.2f} per Lease+Return cycle"
        )
        print("| per cycle | count | statement (first words) |")
        print("|---|---|---|")
        for text, n in counts.most_common():
            print(f"| {n / cycles:.3f} | {n} | `{text}` |")
    finally:
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.statements", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--checkout", type=Path, help="run `vmpool serve` from this checkout (before/after)"
    )
    args = parser.parse_args()
    if not go_available():
        raise SystemExit("needs Go (the grpc-go load generator)")
    asyncio.run(measure(args.concurrency, args.seconds, args.checkout))


if __name__ == "__main__":
    main()
