"""The configuration reference stays true to the loader."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel

from vmpool.config.loading import parse_config
from vmpool.config.schema import Config

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _keys(ann, f"{path}.")
        else:
            out.add(path)
    return out


def test_every_key_is_documented() -> None:
    text = DOC.read_text()
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", text, flags=re.M))
    from vmpool.config.schema import PoolConfig

    expected = _keys(Config) - {"pools"} | {"pools"} | _keys(PoolConfig)
    assert expected - documented == set(), "undocumented config keys"
    assert documented - expected - {"provider"} == set(), "documented keys that do not exist"


def test_the_documented_example_loads() -> None:
    block = DOC.read_text().split("```yaml", 1)[1].split("```", 1)[0]
    config = parse_config(yaml.safe_load(block))
    assert config.pools[0].name == "small"
