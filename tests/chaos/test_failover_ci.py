"""The failover case that stopped both replicas on an earlier main, in quick
mode (about 45 s): a `-rw` address that reaches the standby before its
promotion, the primary SIGKILLed under load. Every invariant must hold: both
replicas survive, no INTERNAL, every OK change on the new primary.

Runs `python -m tests.chaos --quick --only h-failover-rw` as a subprocess (it
owns its PostgreSQL primary and standby, proxy and servers) and reads its JSON
results. The other failover scenarios run in `nox -s chaos` (docs/chaos.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUDGET = 150  # seconds


@pytest.mark.timeout(BUDGET + 30)
def test_replicas_survive_a_failover_through_a_moving_rw_address(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    command = ["-m", "tests.chaos", "--quick", "--only", "h-failover-rw", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=BUDGET,
        check=False,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert out.exists(), f"no results (exit {proc.returncode}):\n{report}"
    scenario = json.loads(out.read_text())["scenarios"]["h-failover-rw"]
    results = scenario["results"]
    assert set(results) >= {"acked_kept", "replicas_up", "single_leader", "no_internal"}, report
    failed = {name: r["detail"] for name, r in results.items() if r["ok"] is False}
    assert not failed, f"invariants failed: {failed}\n{report}"
    assert scenario["figures"]["acknowledged_missing"] == "0", scenario["figures"]
    assert proc.returncode == 0, report
