"""`python -m tests.bench.gcshare [CHECKOUT]`: the share of `vmpool serve`'s CPU
spent in the garbage collector, by generation, under the grpc-go generator
(Ping at c=64, Lease->Return at c=64 and c=1, 4 s each), in the versus
configuration. CHECKOUT: run another checkout's vmpool (a before/after).
The probe (tests/bench/gcprobe/sitecustomize.py) times each collection with
gc.callbacks; this process's own CPU is the server's, read by the probe."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.bench import versus
from tests.golang import build_go_client, go_available
from tests.pg import TestPostgres

PROBE = Path(__file__).parent / "gcprobe"
PHASES = (("ping", 64), ("lease", 64), ("lease", 1))


def _read(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(path.read_text())
    return state


async def main(checkout: Path | None) -> None:
    if not go_available():
        sys.exit("needs Go with grpc-go sources (tests/golang.py)")
    pg = TestPostgres()
    await pg.setup_template()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = work / "gc.json"
        gen = versus.GoGenerator(await asyncio.to_thread(build_go_client, work / "go"))
        code = [str(checkout.resolve())] if checkout else []
        os.environ["PYTHONPATH"] = os.pathsep.join([str(PROBE), *code])
        os.environ["VMPOOL_GCPROBE_OUT"] = str(out)
        (server,), url = await versus.start_vmpool(work, pg, "vmpool")
        try:
            assert server.proc is not None
            await versus.ready(url, 400)
            side = versus.Side("vmpool", [server.proc.pid], server.address, pg, url)
            for op, c in PHASES:
                await versus.ready(url, 390)
                await asyncio.sleep(1.0)
                a = _read(out)
                r = await versus.measure(side, gen, op, c, 4, 0.5)
                await asyncio.sleep(1.0)
                b = _read(out)
                cpu = b["cpu"] - a["cpu"]
                spent = [round(x - y, 4) for x, y in zip(b["seconds"], a["seconds"], strict=True)]
                runs = [x - y for x, y in zip(b["count"], a["count"], strict=True)]
                print(
                    f"{op} c={c}: {r['calls_per_s']} calls/s, errors {r['errors']}; "
                    f"gc seconds by generation {spent} in {runs} collections: "
                    f"{100 * sum(spent) / cpu:.2f} % of the server's {cpu:.2f} s CPU",
                    flush=True,
                )
        finally:
            server.__exit__()
            pg.stop()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
