"""How the CLI prints: pools as prototext or JSON (proto field names), TAB
tables with an idx column, Go's time format (as inctl prints), and progress on
stderr (so stdout stays the result)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def prototext(pool: papi.Pool) -> str:
    """The Pool as multi-line prototext (default values omitted, as protobuf does)."""
    lines = []
    for key in ("name", "current_status", "desired_status"):
        if getattr(pool, key):
            lines.append(f"{key}: {_quote(getattr(pool, key))}")
    spec = [f"  {k}: {_quote(v)}" for k, v in pool_dict(pool)["spec"].items() if v]
    if spec:
        lines += ["spec {", *spec, "}"]
    if pool.reconciling:
        lines.append("reconciling: true")
    return "\n".join(lines)


def pool_dict(pool: papi.Pool) -> dict[str, Any]:
    """protojson with proto field names and every field."""
    return {
        "name": pool.name,
        "current_status": pool.current_status,
        "desired_status": pool.desired_status,
        "spec": {
            "runtime": pool.spec.runtime,
            "intrinsic_os": pool.spec.intrinsic_os,
            "hardware_template": pool.spec.hardware_template,
            "pool_tier": pool.spec.pool_tier,
        },
        "reconciling": pool.reconciling,
    }


def print_pool(args: argparse.Namespace, pool: papi.Pool, headline: str) -> None:
    if args.output == "json":
        print(json.dumps(pool_dict(pool), ensure_ascii=False))
        return
    print(headline)
    print(prototext(pool))


def tab_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["\t".join(columns)]
    out += ["\t".join(str(v) for v in row) for row in rows]
    return "\n".join(out)


def print_rows(args: argparse.Namespace, columns: Sequence[str], rows: list[list[Any]]) -> None:
    if args.output == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], ensure_ascii=False))
        return
    print(tab_table(columns, rows))


def go_time(ts: datetime) -> str:
    """Go's Time.String() in UTC, as inctl prints lease expiries."""
    utc = ts.astimezone(UTC)
    frac = f".{utc.microsecond:06d}".rstrip("0") if utc.microsecond else ""
    return utc.strftime("%Y-%m-%d %H:%M:%S") + frac + " +0000 UTC"


def progress(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)
