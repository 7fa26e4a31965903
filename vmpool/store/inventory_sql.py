"""The statements of vmpool.store.inventory: the reconciler's reads and writes
over instances and queues, and the admin view's listings. Parameters are $n
placeholders; nothing is ever formatted in but fixed fragments."""

from vmpool.ops.audit import RECONCILER
from vmpool.store.lease_sql import LEASE_FIELDS, QUEUED_WITH_POSITION, end_leases

# One cheap statement a pass: per pool and state, how many and the oldest
# timestamps; per pool, the queue; and the next lease expiry (an index probe).
_SUMMARY = """
SELECT 'instances' AS kind, pool, state, spec_hash, count(*) AS n,
       min(created_at) AS oldest_created, min(ready_at) AS oldest_ready, NULL::timestamptz AS due
FROM instances {where_pool} GROUP BY pool, state, spec_hash
UNION ALL
SELECT 'queue', pool,
       CASE WHEN served THEN 'served' WHEN instance IS NULL THEN 'waiting' ELSE 'set_aside' END,
       '', count(*), min(enqueued_at), NULL, min(expires_at)
FROM reservations {where_pool} GROUP BY 1, 2, 3
UNION ALL
SELECT 'leases', '', '', '', 0, NULL, NULL, (SELECT min(expires_at) FROM leases)
UNION ALL
SELECT 'pools', name, desired_status, '',
       (CASE WHEN configured THEN 1 ELSE 0 END) + (CASE WHEN reached_running THEN 2 ELSE 0 END),
       NULL, NULL, NULL FROM pools {where_name}
"""
SUMMARY = _SUMMARY.format(where_pool="", where_name="")
# The same for some pools only ($1): what an event-driven pass looks at.
SUMMARY_OF = _SUMMARY.format(
    where_pool="WHERE pool = ANY ($1::text[])", where_name="WHERE name = ANY ($1::text[])"
)

_END_EXPIRED = end_leases(
    "SELECT instance FROM leases WHERE expires_at <= $1 ORDER BY instance FOR UPDATE",
    at="$1",
    end_reason="'expired'",
    destroy_reason="'lease expired'",
    ended_by=f"'{RECONCILER}'",
)
EXPIRE_LEASES = f"""
WITH {_END_EXPIRED}
SELECT instance, pool, service_tag, leased_at, principal FROM ended
"""

# An expired reservation leaves the queue; its set-aside instance is free again.
# Reservations served at once are only kept until their expiry (= when served).
_EXPIRE_RESERVATIONS = """
WITH locked AS MATERIALIZED (
    SELECT id FROM reservations WHERE expires_at <= $1{of_pools} ORDER BY id FOR UPDATE
), gone AS (
    DELETE FROM reservations r USING locked WHERE r.id = locked.id
    RETURNING r.id, r.pool, r.instance, r.served
), freed AS (
    UPDATE instances i SET state = 'ready', reservation_id = NULL, state_changed_at = $1
    FROM gone WHERE i.name = gone.instance AND i.state = 'reserved'
)
SELECT id, pool, instance, served,
       set_config('vmpool.reason', 'expired', true) AS why  -- the lease event's kind
FROM gone
"""
EXPIRE_RESERVATIONS = _EXPIRE_RESERVATIONS.format(of_pools="")
# Only in these pools ($2): a new leader's others are still in their grace.
EXPIRE_RESERVATIONS_OF = _EXPIRE_RESERVATIONS.format(of_pools=" AND pool = ANY($2::text[])")

# Set the oldest free instance aside for the oldest waiting reservation. The
# reservation is locked without SKIP LOCKED: skipping a locked head would let
# a younger reservation jump the queue.
SET_ASIDE = """
WITH r AS (
    SELECT id FROM reservations
    WHERE pool = $1 AND instance IS NULL AND NOT served
    ORDER BY seq
    LIMIT 1
    FOR UPDATE
), i AS (
    SELECT name FROM instances
    WHERE pool = $1 AND state = 'ready' AND EXISTS (SELECT 1 FROM r)
    ORDER BY ready_at, name
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), ui AS (
    UPDATE instances SET state = 'reserved', reservation_id = (SELECT id FROM r),
                         state_changed_at = $2
    FROM i WHERE instances.name = i.name
    RETURNING instances.name
), ur AS (
    UPDATE reservations SET instance = ui.name
    FROM ui WHERE reservations.id = (SELECT id FROM r)
    RETURNING reservations.id, reservations.instance
)
SELECT id, instance, pg_notify('vmpool_assigned', id::text) FROM ur
"""

# New instance rows ($1 names) of pool $2 made from spec $4, but never more than
# $5 (max_size) rows of the pool that are not destroying: vmpool_pool_room
# (migration 0072) takes the pool row's lock, so inserts into the pool take
# turns, and counts after it, so two leaders that overlap cannot overfill it.
# One statement: it runs in autocommit with the fence inside it.
ADD_INSTANCES = """
WITH room AS (SELECT vmpool_pool_room($2, $5) AS n)
INSERT INTO instances (name, pool, state, created_at, state_changed_at, spec_hash)
SELECT u.name, $2, 'provisioning', $3, $3, $4
FROM unnest($1::text[]) WITH ORDINALITY AS u(name, i), room
WHERE u.i <= room.n
RETURNING name
"""

# Free instances of pool $1 in state $3 not made from spec $2, oldest first, at
# most $4: the ones a template rollout replaces.
STALE_OF_POOL = """
SELECT name FROM instances
WHERE pool = $1 AND state = $3 AND spec_hash <> $2
ORDER BY ready_at NULLS FIRST, created_at, name
LIMIT $4
"""

WORK_ROWS = """
SELECT name, pool, state, created_at, destroy_reason, spec_hash FROM instances
WHERE state IN ('provisioning', 'destroying')
"""

ALL_ROWS = "SELECT name, pool, state, created_at, destroy_reason, spec_hash FROM instances"

ROWS_NAMED = """
SELECT name, pool, state, created_at, destroy_reason, spec_hash FROM instances
WHERE name = ANY ($1::text[]) AND state NOT IN ('provisioning', 'destroying')
"""

MARK_READY = """
UPDATE instances i SET state = 'ready', ready_at = $3, zone = z.zone, state_changed_at = $3
FROM unnest($1::text[], $2::text[]) AS z(name, zone)
WHERE i.name = z.name AND i.state = 'provisioning'
RETURNING i.name, i.pool, i.created_at
"""

# Free or booting instances to destroy (boot failure, timeout, recycling, drain).
MARK_DESTROYING = """
WITH locked AS MATERIALIZED (
    SELECT name FROM instances WHERE name = ANY ($1::text[]) AND state = ANY ($4::text[])
    ORDER BY name
    FOR UPDATE
)
UPDATE instances i SET state = 'destroying', destroy_reason = $2, state_changed_at = $3
FROM locked WHERE i.name = locked.name
RETURNING i.name, i.pool, i.state_changed_at
"""

READY_OLDER_THAN = """
SELECT name FROM instances WHERE pool = $1 AND state = 'ready' AND ready_at <= $2
"""

FREE_OF_POOL = """
SELECT name FROM instances WHERE pool = $1 AND state IN ('ready', 'provisioning')
"""

DROP_QUEUE = """
WITH gone AS (DELETE FROM reservations WHERE pool = $1 AND NOT served RETURNING instance)
UPDATE instances i SET state = 'ready', reservation_id = NULL, state_changed_at = $2
FROM gone WHERE i.name = gone.instance AND i.state = 'reserved'
"""

# A VM confirmed gone: its row goes.
FORGET = """
DELETE FROM instances WHERE name = ANY ($1::text[]) AND state = 'destroying' RETURNING name
"""

# VMs that disappeared behind our back: leases end (logged), set-aside
# reservations wait again, rows go.
_END_VANISHED = end_leases(
    "SELECT instance FROM leases WHERE instance = ANY ($1::text[]) ORDER BY instance FOR UPDATE",
    at="$2",
    end_reason="'vm vanished'",
    destroy_reason=None,
    ended_by=f"'{RECONCILER}'",
)
VANISHED = f"""
WITH {_END_VANISHED}, unset AS (
    UPDATE reservations SET instance = NULL WHERE instance = ANY ($1::text[])
), rows AS (
    DELETE FROM instances
    WHERE name = ANY ($1::text[]) AND state IN ('provisioning', 'ready', 'reserved', 'leased')
    RETURNING name, pool, state
)
SELECT r.name, r.pool, r.state, e.service_tag, e.principal
FROM rows r LEFT JOIN ended e ON e.instance = r.name
"""

# One batch of lease_history rows ended before $1, at most $2, oldest first.
# (A CTE, not `id IN (SELECT ... LIMIT)`; SKIP LOCKED: nobody else waits on us.)
PRUNE_HISTORY = """
WITH old AS MATERIALIZED (
    SELECT id FROM lease_history WHERE ended_at < $1
    ORDER BY ended_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM lease_history h USING old WHERE h.id = old.id
"""

LIST_LEASES = f"""
SELECT {LEASE_FIELDS}
FROM leases WHERE ($1 = '' OR pool = $1) ORDER BY pool, leased_at, instance
"""

LIST_RESERVATIONS = f"{QUEUED_WITH_POSITION} ORDER BY pool, seq"
