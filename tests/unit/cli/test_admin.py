"""`vmpool status` for autoscaled pools (issue 24): a second table and a JSON key,
and exactly today's output for pools without the block."""

from __future__ import annotations

from datetime import UTC, datetime

from vmpool.cli.admin import pool_json, status_table
from vmpool.proto.vmpool.admin import v1 as adm


def test_status_json_and_table_are_unchanged_without_the_block() -> None:
    plain = adm.PoolStats().parse(bytes(adm.PoolStats(name="p", min_ready=2, max_size=5)))
    assert "autoscale" not in pool_json(plain)
    assert "AUTOSCALE" not in status_table([plain])
    scaled = adm.PoolStats().parse(
        bytes(
            adm.PoolStats(
                name="q",
                autoscale=adm.AutoscaleStats(
                    mode="act",
                    desired_ready=7,
                    reason="profile",
                    decided_at=datetime(2026, 1, 1, tzinfo=UTC),
                ),
            )
        )
    )
    shown = pool_json(scaled)["autoscale"]
    assert (shown["desired_ready"], shown["reason"]) == (7, "profile")
    assert shown["decided_at"] == "2026-01-01T00:00:00Z"
    lines = status_table([plain, scaled]).splitlines()
    assert lines[-2].split()[:3] == ["AUTOSCALE", "MODE", "DESIRED"]
    assert lines[-1].split()[:4] == ["q", "act", "7", "profile"]
