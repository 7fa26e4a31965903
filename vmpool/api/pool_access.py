"""Who may call what on VMPoolService (pool-api.md section 7), on the identity seam.

- Reads (ListPools, ListTiers, ListHardwareTemplates, ListLeases of one pool):
  every caller the server lets in.
- CreatePool: the ``pools`` role (or ``admin``); the pool's owner is the caller.
- Changing an API pool, listing every pool's leases, StopLease: its owner with
  the ``pools`` role, or ``admin``. Config pools: ``admin`` only.

With authentication off (auth.mode none) the caller is ``anonymous`` and holds
the ``pools`` and ``admin`` roles only from loopback (or with
auth.allow_anonymous_admin): identity.md section 4.
"""

from __future__ import annotations

from vmpool.auth.caller import caller, has_role, require_role
from vmpool.core.echo import echo
from vmpool.domain.leasing import PermissionDenied
from vmpool.store.pools import PoolRow

READS = frozenset({"list_leases"})


def authorize_pool_call(action: str, pool: PoolRow | None) -> str:
    """The caller's principal name (an API pool's owner), or PermissionDenied."""
    who = caller()
    name = who.principal.name
    if action in READS and pool is not None:
        return name
    if action == "create":
        require_role("pools")
        return name
    if has_role("admin"):
        return name
    if pool is None:  # every pool's leases, or a lease whose pool is gone
        require_role("admin")
        return name
    require_role("pools")
    if not pool.is_api or pool.owner != name:
        owner = "the configuration file" if not pool.is_api else f'"{echo(pool.owner)}"'
        raise PermissionDenied(
            f'name: pool "{echo(pool.name)}" belongs to {owner}; {action} needs its owner or admin'
        )
    return name
