"""The statements over the pools table (vmpool.store.pools, and the pool rows
the reconciler keeps: vmpool.store.inventory). Parameters are $n placeholders."""

SYNC_POOLS = """
WITH cfg AS (
    SELECT * FROM unnest($1::text[], $2::jsonb[]) AS c(name, labels)
), up AS (
    INSERT INTO pools (name, labels, configured, updated_at)
    SELECT name, labels, true, now() FROM cfg
    ON CONFLICT (name) DO UPDATE
        SET labels = EXCLUDED.labels, configured = true, updated_at = now()
        WHERE pools.source = 'config'
)
UPDATE pools SET configured = false, updated_at = now()
WHERE configured AND source = 'config' AND name <> ALL ($1::text[])
"""

# Config pool names already taken by API pools (the config file loses: the
# API pool keeps its name, the config pool is not synced).
API_POOLS_NAMED = "SELECT name FROM pools WHERE source = 'api' AND name = ANY ($1::text[])"

_POOL_COLUMNS = """
    p.name, p.source, p.configured, p.desired_status, p.reached_running, p.runtime,
    p.intrinsic_os, p.hardware_template, p.pool_tier, p.owner, p.created_at, p.updated_at
"""

# Pools with their instances counted by state: what ListPools shows. Config
# pools removed from the file (draining) are not listed.
POOLS_WITH_COUNTS = f"""
SELECT {_POOL_COLUMNS},
    count(i.name) FILTER (WHERE i.state = 'provisioning') AS provisioning,
    count(i.name) FILTER (WHERE i.state = 'ready') AS ready,
    count(i.name) FILTER (WHERE i.state = 'reserved') AS reserved,
    count(i.name) FILTER (WHERE i.state = 'leased') AS leased,
    count(i.name) FILTER (WHERE i.state = 'destroying') AS destroying,
    coalesce(array_agg(i.spec_hash) FILTER (WHERE i.state IN ('ready', 'provisioning')),
             ARRAY[]::text[]) AS free_hashes
FROM pools p LEFT JOIN instances i ON i.pool = p.name
WHERE (p.source = 'api' OR p.configured) AND ($1::text IS NULL OR p.name = $1)
GROUP BY p.name ORDER BY p.name
"""

POOL_ROW = f"SELECT {_POOL_COLUMNS} FROM pools p WHERE p.name = $1"
LOCK_API_POOL_ROW = POOL_ROW + " FOR UPDATE"

API_POOL_SPECS = """
SELECT name, runtime, intrinsic_os, hardware_template, pool_tier FROM pools WHERE source = 'api'
"""
API_POOL_SPECS_LISTED = API_POOL_SPECS + " AND desired_status <> 'DELETED' ORDER BY name"

# A new API pool; nothing when the name is taken. Other replicas' reconcilers wake.
CREATE_API_POOL = """
INSERT INTO pools (name, labels, configured, source, desired_status, reached_running,
                   runtime, intrinsic_os, hardware_template, pool_tier, owner,
                   created_at, updated_at)
VALUES ($1, '{}', false, 'api', 'RUNNING', false, $2, $3, $4, $5, $6, $7, $7)
ON CONFLICT (name) DO NOTHING
RETURNING name, pg_notify('vmpool_wake', 'pool')
"""

SET_POOL_SPEC = """
UPDATE pools SET runtime = $2, intrinsic_os = $3, hardware_template = $4, pool_tier = $5,
                 updated_at = $6
WHERE name = $1
RETURNING name, pg_notify('vmpool_wake', 'pool')
"""

# Resuming starts INITIALIZING again: RUNNING once min_ready is reached anew.
SET_DESIRED_STATUS = """
UPDATE pools SET desired_status = $2, updated_at = $3,
                 reached_running = reached_running AND desired_status = $2
WHERE name = $1
RETURNING name, pg_notify('vmpool_wake', 'pool')
"""

MARK_REACHED_RUNNING = """
UPDATE pools SET reached_running = true
WHERE name = ANY ($1::text[]) AND desired_status = 'RUNNING' AND NOT reached_running
"""

# A deleted API pool with no VM left disappears; its name is free again.
FORGET_DELETED_POOLS = """
WITH gone AS (
    DELETE FROM pools p
    WHERE p.source = 'api' AND p.desired_status = 'DELETED'
      AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.pool = p.name)
    RETURNING name
), queue AS (
    DELETE FROM reservations r USING gone WHERE r.pool = gone.name
)
SELECT name FROM gone
"""
