"""The autoscale block (issue 24): accepted shapes, and each mistake named on one line."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from vmpool.config.loading import ConfigError, parse_config
from vmpool.domain.pools import PoolSpec, pool_config_for


def pool(**autoscale: Any) -> dict[str, Any]:
    return {"pools": [{"name": "p", "min_ready": 2, "max_size": 50, "autoscale": autoscale}]}


def test_the_issue_example_is_accepted_with_seconds_too() -> None:
    cfg = parse_config(
        pool(
            floor=1,
            ceiling=40,
            target_wait_share=0.01,
            scale_down_delay="10s",
            learn_daily=True,
            period="60s",
            bin="5s",
            window="20s",
            mode="act",
        )
    )
    block = cfg.pools[0].autoscale
    assert block is not None
    assert (block.floor, block.ceiling, block.period, block.bin) == (
        1,
        40,
        timedelta(seconds=60),
        timedelta(seconds=5),
    )
    assert block.scale_down_delay == timedelta(seconds=10)
    assert block.acts


def test_without_the_block_a_pool_has_none() -> None:
    cfg = parse_config({"pools": [{"name": "p"}]})
    assert cfg.pools[0].autoscale is None


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"floor": 5, "ceiling": 3}, "pools[0].autoscale: floor (5) exceeds ceiling (3)"),
        ({"ceiling": 60}, "pools[0]: autoscale.ceiling (60) exceeds max_size (50)"),
        ({"floor": 51}, "pools[0]: autoscale.floor (51) exceeds max_size (50)"),
        ({"target_wait_share": 0}, "pools[0].autoscale.target_wait_share: "),
        ({"target_wait_share": 1}, "pools[0].autoscale.target_wait_share: "),
        ({"target_wait_share": 1.5}, "pools[0].autoscale.target_wait_share: "),
        ({"scale_down_delay": "0s"}, "pools[0].autoscale.scale_down_delay: must be positive"),
        ({"period": "-5m"}, "pools[0].autoscale.period: "),
        ({"bin": "0s"}, "pools[0].autoscale.bin: must be positive"),
        ({"window": 30}, "pools[0].autoscale.window: 30 is not a duration string"),
        ({"period": "1h", "bin": "7m"}, "pools[0].autoscale: bin (420s) does not divide period"),
        ({"period": "1m", "bin": "2m"}, "pools[0].autoscale: bin (120s) does not divide period"),
        ({"mode": "auto"}, "pools[0].autoscale.mode: "),
        ({"period": "24h", "bin": "1s"}, "pools[0].autoscale: period / bin is 86400 bins"),
        ({"window": "2d"}, "pools[0].autoscale: window: at most 24h"),
        ({"flor": 1}, "pools[0].autoscale.flor: unknown key"),
    ],
)
def test_a_bad_block_stops_start_up_with_one_line_naming_the_key(
    block: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(pool(**block), source="cfg.yaml")
    assert err.value.lines() == [str(err.value)]
    assert str(err.value).startswith(f"cfg.yaml: {expected}"), str(err.value)


def test_a_tier_carries_the_block_to_its_api_pools() -> None:
    cfg = parse_config(
        {"tiers": [{"name": "burst", "min_ready": 1, "max_size": 30, "autoscale": {"ceiling": 30}}]}
    )
    made = pool_config_for(cfg, "api-pool", PoolSpec("rt", "os", "default", "burst"))
    assert made is not None and made.autoscale is not None
    assert made.autoscale.ceiling == 30


def test_a_tier_block_is_checked_against_the_tier_size() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"tiers": [{"name": "t", "max_size": 3, "autoscale": {"ceiling": 4}}]})
    assert "tiers[0]: autoscale.ceiling (4) exceeds max_size (3)" in str(err.value)
