"""The chaos scenarios in quick mode (about two minutes): every invariant must hold.

Runs `python -m tests.chaos --quick` as a subprocess (it owns its PostgreSQL,
servers and fake Kubernetes API) and reads its JSON results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUDGET = 280  # seconds for the whole quick run


@pytest.mark.timeout(BUDGET + 30)
def test_chaos_scenarios_quick(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--quick", "--json", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=BUDGET,
        check=False,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert out.exists(), f"no results (exit {proc.returncode}):\n{report}"
    results = json.loads(out.read_text())
    failed = {
        f"{scenario}/{name}": r["detail"]
        for scenario, s in results["scenarios"].items()
        for name, r in s["results"].items()
        if r["ok"] is False
    }
    assert not failed, f"invariants failed: {failed}\n{report}"
    missing = [s for s, v in results["scenarios"].items() if not v["results"]]
    assert not missing, f"scenarios crashed: {missing}\n{report}"
    assert len(results["scenarios"]) == 5
    assert proc.returncode == 0, report
