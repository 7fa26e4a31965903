"""Run the chaos scenarios and print scenarios x invariants.

    python -m tests.chaos [--quick | --long] [--only a-sigkill,d-kube] [--json FILE]

--long (or --only) also runs the opt-in scenarios (f-pg-sigkill: SIGKILL of PostgreSQL).
--quick leaves out the failover scenarios (g-... k-..., tests/chaos/failover.py:
a primary and a standby PostgreSQL, two replicas); `--only g-failover` runs one.

Exit status 1 if any invariant fails (2 if a scenario could not run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.chaos import invariants as inv
from tests.chaos.failover import scenarios as failover_scenarios
from tests.chaos.harness import ChaosPostgres
from tests.chaos.scenarios import MODES, OPT_IN, SCENARIOS, Outcome

FAILOVER = failover_scenarios()
ALL = {**SCENARIOS, **FAILOVER}


def table(outcomes: list[Outcome]) -> str:
    cols = list(inv.NAMES)
    width = max(len(c) for c in cols)
    head = ["scenario".ljust(12)] + [c.ljust(max(width - 4, 8))[: max(width - 4, 8)] for c in cols]
    head = ["scenario".ljust(12)] + [c.ljust(15) for c in cols] + ["time"]
    lines = [" | ".join(head), "-+-".join("-" * len(h) for h in head)]
    for o in outcomes:
        cells = [o.scenario.ljust(12)]
        for c in cols:
            r = o.results.get(c)
            cells.append((r.label if r else "-" if o.results else "ERROR").ljust(15))
        cells.append(f"{o.seconds:5.1f}s")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    mode = MODES[args.mode]
    every = [n for n in ALL if n not in OPT_IN or mode.name == "long"]
    if mode.name == "quick":
        every = [n for n in every if n not in FAILOVER]
    names = every if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown scenarios {unknown}; choose from {list(ALL)}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="vmpool-chaos-"))
    print(f"chaos: mode {mode.name}, scenarios {names}, logs under {workdir}", flush=True)
    started = time.monotonic()
    pg = ChaosPostgres()
    outcomes: list[Outcome] = []
    crashed = False
    try:
        await pg.setup_template()
        for name in names:
            t = time.monotonic()
            print(f"--- {name} ...", flush=True)
            try:
                outcome = await ALL[name](pg, mode, workdir)
            except Exception:
                crashed = True
                outcome = Outcome(name, seconds=time.monotonic() - t)
                outcome.notes.append("scenario crashed:\n" + traceback.format_exc())
            outcomes.append(outcome)
            for key, r in outcome.results.items():
                print(f"    {r.label:4} {inv.NAMES[key]}: {r.detail}", flush=True)
            for note in outcome.notes:
                print(f"    note: {note}", flush=True)
    finally:
        pg.stop()
    total = time.monotonic() - started
    print()
    print(table(outcomes))
    print(f"\ntotal {total:.0f}s (mode {mode.name})")
    failed = [(o.scenario, k) for o in outcomes for k, r in o.results.items() if r.ok is False]
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "mode": mode.name,
                    "seconds": round(total, 1),
                    "scenarios": {
                        o.scenario: {
                            "seconds": round(o.seconds, 1),
                            "notes": o.notes,
                            "figures": o.figures,
                            "results": {
                                k: {"ok": r.ok, "detail": r.detail} for k, r in o.results.items()
                            },
                        }
                        for o in outcomes
                    },
                },
                indent=2,
            )
        )
    if not args.keep and not failed and not crashed:
        shutil.rmtree(workdir, ignore_errors=True)
    if crashed:
        return 2
    if failed:
        print(f"FAILED: {failed}")
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick", dest="mode", action="store_const", const="quick", help="short storms (CI)"
    )
    group.add_argument(
        "--long", dest="mode", action="store_const", const="long", help="long storms"
    )
    parser.set_defaults(mode="default")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--json", default="", help="write the results here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep server logs even on success")
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
