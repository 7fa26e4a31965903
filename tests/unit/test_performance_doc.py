"""docs/performance.md's results table is generated from bench-results/latest.json
(tests/bench/report.py writes it); the two must agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.bench import report
from tests.bench.versus import ratio_sets

REPO = Path(__file__).resolve().parents[2]
LATEST = REPO / "bench-results" / "latest.json"


def test_the_results_table_is_the_committed_runs() -> None:
    result = json.loads(LATEST.read_text())
    doc = (REPO / "docs" / "performance.md").read_text()
    assert report.doc_block(doc) == report.doc_table(result), (
        "docs/performance.md's results disagree with bench-results/latest.json: "
        "`nox -s bench` regenerates both (or tests.bench.report.update_doc(result))"
    )
    block = report.doc_block(doc)
    assert f"{result['ping_rps']:,.0f}" in block and f"{result['lease_calls_per_s']:,.0f}" in block


def test_the_bench_regenerates_the_table(tmp_path: Path) -> None:
    result = json.loads(LATEST.read_text())
    result["ping_rps"] = 12345.6
    result["targets"]["scale_p50_ratio <= 1.2"] = False
    doc = tmp_path / "performance.md"
    doc.write_text(f"# P\n\nbefore\n{report.DOC_BEGIN}\nold table\n{report.DOC_END}\nafter\n")
    report.update_doc(result, doc)  # what report.write does after latest.json and .md
    text = doc.read_text()
    assert (
        "old table" not in text and text.startswith("# P\n\nbefore\n") and text.endswith("after\n")
    )
    assert "| `ping_rps` (c=64) | 12,346 | — |" in text
    assert f"| `scale_p50_ratio` | {result['scale_p50_ratio']:.2f} **FAIL** | ≤ 1.2 |" in text


def test_before_after_ratios_are_each_side_against_the_floor_and_after_against_before() -> None:
    """A --baseline run reports before / floor beside vmpool / floor, and their
    quotient: a before-vs-floor column that repeated after-vs-before hid whether
    the old code had met a target."""

    def side(ms: float) -> dict[str, Any]:
        return {"lease@64": {"server_cpu_ms_per_call": ms}}

    rounds = [{"floor": side(0.5), "vmpool": side(0.6), "before": side(0.75)}]
    sets = ratio_sets(rounds, with_before=True)
    assert sets["ratios"]["lease_server_cpu"]["median"] == 1.2
    assert sets["ratios_before"]["lease_server_cpu"]["median"] == 1.5
    assert sets["ratios_after_to_before"]["lease_server_cpu"]["median"] == 0.8
    assert "ratios_before" not in ratio_sets(rounds, with_before=False)
