"""The committed betterproto code must match what api/ generates."""

from __future__ import annotations

import filecmp
from pathlib import Path

from vmpool.wire import protogen

ROOT = Path(__file__).resolve().parents[3]


def _outputs(root: Path) -> list[Path]:
    """The generated code and the descriptor set reflection serves."""
    return [*root.rglob("*.py"), *root.rglob(protogen.DESCRIPTORS)]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "proto"
    protogen.generate(out, protogen.PROTOS)
    committed = ROOT / "vmpool" / "proto"
    generated = sorted(p.relative_to(out) for p in _outputs(out))
    present = sorted(p.relative_to(committed) for p in _outputs(committed))
    assert generated == present, "run `nox -s protos`"
    stale = [str(p) for p in generated if not filecmp.cmp(out / p, committed / p, shallow=False)]
    assert not stale, f"stale generated code (run `nox -s protos`): {stale}"
