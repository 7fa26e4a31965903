"""`vmpool render` for API pools: the VM a pool of a tier and hardware template
gets, offline from flags or from the pool's stored spec in the database."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from vmpool.cli.errors import local_failure
from vmpool.domain import pools
from vmpool.domain.leasing import ClientError
from vmpool.providers.kubevirt_manifest import render_preview
from vmpool.store.db import create_pool
from vmpool.store.pools import PoolStore


def render_api_pool(args: argparse.Namespace, config: Any) -> int:
    """Print the VM an API pool gets: from --tier/--hwtemplate/--runtime/--intrinsic-os
    (offline), or from its stored spec in the configured database."""
    try:
        if args.tier or args.hwtemplate or args.runtime or args.intrinsic_os:
            spec = pools.resolve_spec(
                config,
                pools.PoolSpec(
                    args.runtime or "",
                    args.intrinsic_os or "",
                    args.hwtemplate or "",
                    args.tier or "",
                ),
            )
        else:
            stored = _stored_spec(config, args.pool)
            if stored is None:
                raise local_failure(
                    f'--pool: no pool named "{args.pool}" in {args.config} or in its database '
                    "(or give --hwtemplate to render an API pool without the database)"
                )
            spec = stored
        cfg = pools.pool_config_for(config, args.pool, spec)
    except ClientError as err:
        raise local_failure(
            str(err).removeprefix("spec.").replace("pool_tier", "--tier", 1)
        ) from None
    if cfg is None:
        raise local_failure(f'--pool: "{args.pool}" uses a tier or template not in {args.config}')
    print(render_preview(config, cfg), end="")
    return 0


def _stored_spec(config: Any, name: str) -> Any:
    """An API pool's spec from the database of ``config`` (None: not there, or no database)."""
    if not config.database_url:
        return None

    async def fetch() -> Any:
        db = await create_pool(config.database_url, min_size=1, max_size=1)
        try:
            return await PoolStore(db).get(name)
        finally:
            await db.close()

    row = asyncio.run(fetch())
    if row is None or not row.is_api:
        return None
    return pools.PoolSpec.of(row)
