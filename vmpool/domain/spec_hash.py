"""A stable hash of the VM spec an instance is created from (template rollout).

Each instance row records the hash of its pool's effective VM spec at the time
the row was written. When the pool's spec changes, instances of another hash
are "stale": free ones are replaced (new first) and leased ones are destroyed
when their lease ends, as every leased VM is. No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from hashlib import sha256
from typing import Any

from vmpool.config.schema import PoolConfig

#: The hash recorded for rows written before hashes existed: never current.
UNKNOWN = ""


def spec_hash(spec: Mapping[str, Any]) -> str:
    """16 hex digits over the canonical JSON of ``spec`` (keys sorted, no spaces):
    equal mappings hash alike whatever their key order. ``spec`` is what the
    provider builds a VM from, e.g. a pool's template (config pools) or the
    spec/template of a pool made through the pool API."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return sha256(text.encode()).hexdigest()[:16]


def effective_spec(pool: PoolConfig) -> dict[str, Any]:
    """What a configured pool's VMs are made from. Labels, zone and the sizing
    keys are not part of it: changing them does not change a VM."""
    return {"template": pool.template}


def pool_spec_hash(pool: PoolConfig) -> str:
    return spec_hash(effective_spec(pool))
