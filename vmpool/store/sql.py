"""Named SQL. Parameters are $n placeholders; nothing is ever formatted in."""

# --- leasing (the RPC hot path) ---------------------------------------------

# Lease the oldest free instances of a pool to a batch of requests, in one
# statement ($2 = how many; request i gets the i-th claimed instance). Nobody
# jumps the queue: while a reservation of this pool waits with nothing set
# aside, free instances are for the reconciler to set aside, not for this claim.
CLAIM_FREE = """
WITH pick AS MATERIALIZED (
    SELECT name FROM instances
    WHERE pool = $1 AND state = 'ready'
      AND NOT EXISTS (
          SELECT 1 FROM reservations WHERE pool = $1 AND instance IS NULL AND NOT served)
      AND NOT EXISTS (SELECT 1 FROM pools WHERE name = $1 AND drained)
    ORDER BY ready_at, name
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT name, row_number() OVER (ORDER BY name) AS n FROM pick
), req AS (
    SELECT * FROM unnest($3::text[], $4::timestamptz[], $6::text[], $7::text[], $8::int[],
                         $9::smallint[])
        WITH ORDINALITY AS r(tag, expires, principal, owner, lease_limit, round_ns, n)
), claimed AS (
    UPDATE instances i SET state = 'leased', state_changed_at = $5
    FROM numbered p WHERE i.name = p.name
    RETURNING i.name, i.pool, i.zone, p.n
), leased AS (
    INSERT INTO leases (instance, pool, service_tag, reservation_id, leased_at, expires_at,
                        expires_round_ns, zone, principal, owner, lease_limit)
    SELECT c.name, c.pool, r.tag, NULL, $5, r.expires, r.round_ns, c.zone, r.principal, r.owner,
           r.lease_limit
    FROM claimed c JOIN req r USING (n)
)
SELECT r.n, c.name AS instance, c.pool, r.tag AS service_tag, NULL::uuid AS reservation_id,
       $5::timestamptz AS leased_at, r.expires AS expires_at,
       r.round_ns AS expires_round_ns, c.zone, r.principal
FROM claimed c JOIN req r USING (n)
"""

# First use of a reservation id: lease a free instance now, or join the queue,
# in one statement. The reservation row is inserted either way (served, or
# queued), so two concurrent first uses of one id collide on its primary key
# and one of them fails whole: never two VMs, never a lease plus a queue entry.
# Nothing happens in a drained pool. $6 is the queue entry's expiry; $7-$10 the
# owner (principal, quota key, queue limit, lease limit: triggers check them);
# $11 the lease's expires_round_ns.
CLAIM_OR_ENQUEUE = """
WITH open AS (
    SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM pools WHERE name = $1 AND drained)
), pick AS (
    SELECT name FROM instances
    WHERE pool = $1 AND state = 'ready' AND EXISTS (SELECT 1 FROM open)
      AND NOT EXISTS (
          SELECT 1 FROM reservations WHERE pool = $1 AND instance IS NULL AND NOT served)
    ORDER BY ready_at, name
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE instances i SET state = 'leased', state_changed_at = $4
    FROM pick WHERE i.name = pick.name
    RETURNING i.name, i.pool, i.zone
), lease AS (
    INSERT INTO leases (instance, pool, service_tag, reservation_id, leased_at, expires_at,
                        expires_round_ns, zone, principal, owner, lease_limit)
    SELECT name, pool, $2, $3, $4, $5, $11, zone, $7, $8, $10 FROM claimed
    RETURNING instance, pool, service_tag, reservation_id, leased_at, expires_at,
              expires_round_ns, zone, principal
), res AS (
    INSERT INTO reservations (id, pool, service_tag, enqueued_at, expires_at, served,
                              principal, owner, queue_limit)
    SELECT $3, $1, $2, $4,
           CASE WHEN EXISTS (SELECT 1 FROM claimed) THEN $4 ELSE $6 END,
           EXISTS (SELECT 1 FROM claimed), $7, $8, $9
    FROM open
    RETURNING seq, served
)
SELECT r.seq, r.served, l.instance, l.pool, l.service_tag, l.reservation_id, l.leased_at,
       l.expires_at, l.expires_round_ns, l.zone, l.principal,
       (SELECT pg_notify('vmpool_wake', 'enqueue') WHERE NOT r.served) AS notified
FROM res r LEFT JOIN lease l ON true
"""

# Serve a queued reservation from the instance set aside for it ($5: the
# owner's active lease quota, checked by the leases trigger; 0: none).
SERVE_RESERVED = """
WITH r AS (
    DELETE FROM reservations r USING instances i
    WHERE r.id = $1 AND NOT r.served AND i.name = r.instance AND i.state = 'reserved'
    RETURNING r.instance, r.pool, r.service_tag, r.enqueued_at, r.principal, r.owner
), claimed AS (
    UPDATE instances i SET state = 'leased', reservation_id = NULL, state_changed_at = $2
    FROM r WHERE i.name = r.instance
    RETURNING i.name, i.pool, i.zone, r.service_tag, r.principal, r.owner
)
INSERT INTO leases (instance, pool, service_tag, reservation_id, leased_at, expires_at,
                    expires_round_ns, zone, principal, owner, lease_limit)
SELECT name, pool, service_tag, $1, $2, $3, $4, zone, principal, owner, $5 FROM claimed
RETURNING instance, pool, service_tag, reservation_id, leased_at, expires_at,
          expires_round_ns, zone, principal, (SELECT enqueued_at FROM r) AS enqueued_at
"""

# Everything known about a reservation id, in one round trip.
RESERVATION_LOOKUP = """
SELECT 'lease' AS kind, instance, pool, service_tag, expires_at, expires_round_ns, zone,
       leased_at, NULL::bigint AS seq, principal
FROM leases WHERE reservation_id = $1
UNION ALL
SELECT 'queued', instance, pool, service_tag, expires_at, 0, NULL, NULL, seq, principal
FROM reservations WHERE id = $1 AND NOT served
UNION ALL
(SELECT 'ended', instance, pool, service_tag, ended_at, 0, zone, leased_at, NULL, principal
 FROM lease_history WHERE reservation_id = $1 ORDER BY ended_at DESC LIMIT 1)
"""

# Keep a queued reservation alive; says whether an instance is set aside yet.
TOUCH_RESERVATION = """
UPDATE reservations SET expires_at = greatest(expires_at, $2)
WHERE id = $1 AND NOT served
RETURNING instance, seq, pool
"""

QUEUE_POSITION = """
SELECT count(*) FILTER (WHERE seq <= $2) AS position, count(*) AS length
FROM reservations WHERE pool = $1 AND NOT served
"""

# End a batch of leases ($1 instances, $2 their service_tags, $5 principals)
# and mark their VMs for destruction. A request whose owner does not match
# ends nothing.
RETURN_LEASES = """
WITH req AS (
    SELECT * FROM unnest($1::text[], $2::text[], $5::text[]) AS r(instance, tag, principal)
), locked AS MATERIALIZED (
    -- Rows taken in a fixed order: batches and expiries never deadlock.
    SELECT l.instance FROM leases l JOIN req r
        ON l.instance = r.instance AND l.service_tag = r.tag AND l.principal = r.principal
    ORDER BY l.instance
    FOR UPDATE OF l
), ended AS (
    DELETE FROM leases l USING locked WHERE l.instance = locked.instance
    RETURNING l.*
), hist AS (
    INSERT INTO lease_history (instance, pool, service_tag, reservation_id, leased_at,
                               expires_at, ended_at, end_reason, zone, principal)
    SELECT instance, pool, service_tag, reservation_id, leased_at, expires_at, $3,
           'returned', zone, principal
    FROM ended
), gone AS (
    UPDATE instances i SET state = 'destroying', destroy_reason = 'returned',
                           state_changed_at = $3
    FROM ended WHERE i.name = ended.instance
)
SELECT instance, service_tag, principal, pool, leased_at,
       (SELECT pg_notify('vmpool_wake', 'return') WHERE $4) AS notified
FROM ended
"""

# Undo a claim whose caller was gone when it committed ($1 instance, $2 its
# leased_at): nobody received the VM, so it is free again, first in line (its
# ready_at is kept). Only a lease without a reservation: a reservation's lease
# stays for the client's retry (lease-api.md section 3, rule 1).
UNCLAIM = """
WITH gone AS (
    DELETE FROM leases
    WHERE instance = $1 AND leased_at = $2 AND reservation_id IS NULL
    RETURNING instance
)
UPDATE instances i SET state = 'ready', state_changed_at = $3
FROM gone WHERE i.name = gone.instance AND i.state = 'leased'
RETURNING i.name, i.pool
"""

# Used only after a tag-checked write found nothing: which error is it?
LEASE_OWNER = "SELECT service_tag, principal FROM leases WHERE instance = $1"

GET_LEASE = """
SELECT instance, pool, service_tag, reservation_id, leased_at, expires_at, expires_round_ns, zone,
       principal
FROM leases WHERE instance = $1
"""

LOCK_LEASE = GET_LEASE + " FOR UPDATE"

SET_EXPIRY = """
UPDATE leases SET expires_at = $2, expires_round_ns = $3 WHERE instance = $1
RETURNING instance, pool, service_tag, reservation_id, leased_at, expires_at, expires_round_ns,
          zone, principal
"""

FREE_COUNTS = """
SELECT pool, count(*) AS free FROM instances WHERE state = 'ready' GROUP BY pool
"""

POOL_DESIRED_STATUS = "SELECT desired_status FROM pools WHERE name = $1"

PING = "SELECT 1"

# --- pools -----------------------------------------------------------------

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

# --- API pools (VMPoolService) -------------------------------------------------

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

# --- the reconciler ----------------------------------------------------------

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

EXPIRE_LEASES = """
WITH locked AS MATERIALIZED (
    SELECT instance FROM leases WHERE expires_at <= $1 ORDER BY instance FOR UPDATE
), ended AS (
    DELETE FROM leases l USING locked WHERE l.instance = locked.instance
    RETURNING l.*
), hist AS (
    INSERT INTO lease_history (instance, pool, service_tag, reservation_id, leased_at,
                               expires_at, ended_at, end_reason, zone)
    SELECT instance, pool, service_tag, reservation_id, leased_at, expires_at, $1,
           'expired', zone
    FROM ended
), gone AS (
    UPDATE instances i SET state = 'destroying', destroy_reason = 'lease expired',
                           state_changed_at = $1
    FROM ended WHERE i.name = ended.instance
)
SELECT instance, pool, service_tag, leased_at FROM ended
"""

# An expired reservation leaves the queue; its set-aside instance is free again.
# Reservations served at once are only kept until their expiry (= when served).
EXPIRE_RESERVATIONS = """
WITH locked AS MATERIALIZED (
    SELECT id FROM reservations WHERE expires_at <= $1 ORDER BY id FOR UPDATE
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
# $5 (max_size) rows of the pool that are not destroying: the count is taken in
# this statement, after LOCK_POOL_ROW (same transaction) made inserts into the
# pool take turns, so two leaders that overlap cannot overfill it.
LOCK_POOL_ROW = "SELECT 1 FROM pools WHERE name = $1 FOR NO KEY UPDATE"

ADD_INSTANCES = """
WITH room AS (
    SELECT $5::int - count(*) AS n FROM instances WHERE pool = $2 AND state <> 'destroying'
)
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
FORGET = "DELETE FROM instances WHERE name = ANY ($1::text[]) AND state = 'destroying'"

# VMs that disappeared behind our back: leases end (logged), set-aside
# reservations wait again, rows go.
VANISHED = """
WITH locked AS MATERIALIZED (
    SELECT instance FROM leases WHERE instance = ANY ($1::text[]) ORDER BY instance FOR UPDATE
), ended AS (
    DELETE FROM leases l USING locked WHERE l.instance = locked.instance
    RETURNING l.*
), hist AS (
    INSERT INTO lease_history (instance, pool, service_tag, reservation_id, leased_at,
                               expires_at, ended_at, end_reason, zone)
    SELECT instance, pool, service_tag, reservation_id, leased_at, expires_at, $2,
           'vm vanished', zone
    FROM ended
), unset AS (
    UPDATE reservations SET instance = NULL WHERE instance = ANY ($1::text[])
), rows AS (
    DELETE FROM instances
    WHERE name = ANY ($1::text[]) AND state IN ('provisioning', 'ready', 'reserved', 'leased')
    RETURNING name, pool, state
)
SELECT r.name, r.pool, r.state, e.service_tag
FROM rows r LEFT JOIN ended e ON e.instance = r.name
"""

# --- leadership (vmpool.store.control) ---------------------------------------------

# Take the leader row ($1 holder, $2 ttl seconds) if it has expired, is our
# own from before a lost connection, or ($3) we have just got the advisory lock
# that every leader holds on its control connection and the holder held it
# (`locked`): then the last leader's session is gone (a killed leader is
# replaced at once, not after its ttl). $4: we hold the lock now. The first
# row ever needs the lock too, so a process of this version never leads beside
# one of the previous version (which led by that lock alone). Always a new
# term, so writes checked against an older term fail. Times are the
# database's: the replicas' clocks do not matter.
LEADER_ACQUIRE = """
WITH taken AS (
    UPDATE leader SET holder = $1, term = term + 1, renewed_at = now(),
                      expires_at = now() + make_interval(secs => $2), locked = $4
    WHERE id = 1 AND (expires_at <= now() OR holder = $1 OR ($3::bool AND locked))
    RETURNING term
), first AS (
    INSERT INTO leader (id, holder, term, renewed_at, expires_at, locked)
    SELECT 1, $1, 1, now(), now() + make_interval(secs => $2), true
    WHERE $4::bool AND NOT EXISTS (SELECT 1 FROM leader)
    ON CONFLICT (id) DO NOTHING
    RETURNING term
)
SELECT term FROM taken UNION ALL SELECT term FROM first
"""

# A process that never reconciles (role api) wakes the leader's reconciler.
WAKE = "SELECT pg_notify('vmpool_wake', $1)"

# The same key as the previous version's leader lock.
LEADER_LOCK = "SELECT pg_try_advisory_lock(33334376925195265)"
LEADER_UNLOCK = "SELECT pg_advisory_unlock(33334376925195265)"

# The leader extends its term ($3 ttl seconds; $4 whether it holds the lock
# now); nothing if the term is over.
LEADER_RENEW = """
UPDATE leader SET renewed_at = now(), expires_at = now() + make_interval(secs => $3),
                  locked = $4
WHERE id = 1 AND holder = $1 AND term = $2 AND expires_at > now()
RETURNING term
"""

# Step down: a follower may take over at once.
LEADER_RELEASE = """
UPDATE leader SET expires_at = now() WHERE id = 1 AND holder = $1 AND term = $2
"""

# The fence: the first statement of every reconciler write transaction. The
# share lock keeps a takeover (an UPDATE of this row) waiting until the write
# commits; after a takeover it finds nothing, and the write is refused.
LEADER_FENCE = """
SELECT term FROM leader
WHERE id = 1 AND holder = $1 AND term = $2 AND expires_at > now()
FOR SHARE
"""

# --- housekeeping -------------------------------------------------------------------

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

# --- admin ---------------------------------------------------------------------

LIST_LEASES = """
SELECT instance, pool, service_tag, reservation_id, leased_at, expires_at, expires_round_ns, zone,
       principal
FROM leases WHERE ($1 = '' OR pool = $1) ORDER BY pool, leased_at, instance
"""

LIST_RESERVATIONS = """
SELECT id, pool, service_tag, enqueued_at, expires_at, instance, principal,
       row_number() OVER (PARTITION BY pool ORDER BY seq) AS position
FROM reservations WHERE ($1 = '' OR pool = $1) AND NOT served ORDER BY pool, seq
"""

FORCE_RETURN = """
WITH ended AS (
    DELETE FROM leases WHERE instance = $1
    RETURNING *
), hist AS (
    INSERT INTO lease_history (instance, pool, service_tag, reservation_id, leased_at,
                               expires_at, ended_at, end_reason, zone, principal)
    SELECT instance, pool, service_tag, reservation_id, leased_at, expires_at, $2, $3, zone,
           principal
    FROM ended
), gone AS (
    UPDATE instances i SET state = 'destroying', destroy_reason = $3, state_changed_at = $2
    FROM ended WHERE i.name = ended.instance
)
SELECT pool, leased_at, service_tag, principal, pg_notify('vmpool_wake', 'return'),
       set_config('vmpool.principal', $4, true) AS cause  -- the lease event's cause
FROM ended
"""

# --- the fake provider's cloud --------------------------------------------------

FAKE_CREATE = """
INSERT INTO fake_vms (name, pool, created_at, ready_at, fails, zone)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                     $5::boolean[], $6::text[])
ON CONFLICT (name) DO NOTHING
"""
FAKE_DELETE = "DELETE FROM fake_vms WHERE name = ANY ($1::text[])"
FAKE_LIST = "SELECT name, pool, created_at, ready_at, fails, zone FROM fake_vms"

# --- extension API (CancelReservation, DescribeInstance) ------------------------

# Withdraw a queued reservation of this service_tag ($2) and principal ($4); the instance set aside
# for it (if any) is free again, first in line (its ready_at is kept), and the
# reconciler is woken to hand it to the next reservation.
CANCEL_RESERVATION = """
WITH gone AS (
    DELETE FROM reservations
    WHERE id = $1 AND NOT served AND service_tag = $2 AND principal = $4
    RETURNING pool, instance
), freed AS (
    UPDATE instances i SET state = 'ready', reservation_id = NULL, state_changed_at = $3
    FROM gone WHERE i.name = gone.instance AND i.state = 'reserved'
)
SELECT pool, instance, pg_notify('vmpool_wake', 'cancel'),
       set_config('vmpool.principal', $4, true) AS cause  -- the lease event's cause
FROM gone
"""

FAKE_GET = FAKE_LIST + " WHERE name = $1"
