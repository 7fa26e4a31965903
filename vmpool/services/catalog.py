"""Every pool's PoolConfig: the config file's, and the API pools' from the database.

The reconciler refreshes the API pools once a pass (one query), so a pool
created on any replica is provisioned by the leader at its next pass (a
NOTIFY wakes it at once). The lease path looks an API pool up when it is
named: every replica sees a new pool the moment CreatePool has committed.
"""

from __future__ import annotations

from collections.abc import Iterator

from vmpool.config.schema import Config, PoolConfig
from vmpool.domain import pools
from vmpool.domain.spec_hash import pool_spec_hash, spec_hash
from vmpool.store.pools import PoolStore


class PoolCatalog:
    def __init__(self, config: Config, store: PoolStore | None = None) -> None:
        self._config = config
        self._store = store
        # The config's pools by name: looked up on every Lease (Config.pool scans).
        self._static: dict[str, PoolConfig] = {p.name: p for p in config.pools}
        self._static_hashes: dict[str, tuple[PoolConfig, str]] = {}
        self._api: dict[str, PoolConfig] = {}
        self._hashes: dict[str, str] = {}

    async def refresh(self) -> None:
        """Re-read the API pools (the reconciler, at the start of each pass)."""
        if self._store is None:
            return
        fresh: dict[str, PoolConfig] = {}
        hashes: dict[str, str] = {}
        for row in await self._store.api_specs():
            spec = pools.PoolSpec.of(row)
            cfg = pools.pool_config_for(self._config, row.name, spec)
            if cfg is not None:
                fresh[row.name] = cfg
                hashes[row.name] = api_spec_hash(cfg, spec)
        self._api, self._hashes = fresh, hashes

    def spec_hash(self, pool: PoolConfig) -> str:
        """The hash instances of ``pool`` are made with (template rollout)."""
        if pool.name not in self._static and pool.name in self._hashes:
            return self._hashes[pool.name]
        # Asked for every pool on every pass: hashed once per PoolConfig object.
        cached = self._static_hashes.get(pool.name)
        if cached is None or cached[0] is not pool:
            cached = self._static_hashes[pool.name] = (pool, pool_spec_hash(pool))
        return cached[1]

    def pool(self, name: str) -> PoolConfig | None:
        """A config pool, or an API pool as of the last refresh."""
        return self._static.get(name) or self._api.get(name)

    def __iter__(self) -> Iterator[PoolConfig]:
        yield from self._config.pools
        for name, cfg in self._api.items():
            if name not in self._static:
                yield cfg

    async def find(self, name: str) -> PoolConfig | None:
        """A config pool, or the API pool of that name as stored now."""
        found = self._static.get(name)
        if found is not None or self._store is None:
            return found
        row = await self._store.get(name)
        if row is None or not row.is_api:
            return None
        spec = pools.PoolSpec.of(row)
        return pools.pool_config_for(self._config, name, spec)


def api_spec_hash(pool: PoolConfig, spec: pools.PoolSpec) -> str:
    """An API pool's VMs change with its template and with the versions and
    template named in its spec (also when the template does not use them):
    an UpdatePool of any of these rolls the pool. The tier is sizing only."""
    return spec_hash(
        {
            "template": pool.template,
            "runtime": spec.runtime,
            "intrinsic_os": spec.intrinsic_os,
            "hardware_template": spec.hardware_template,
        }
    )
