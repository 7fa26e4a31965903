"""The statements of vmpool.store.leases (the RPC hot path). Parameters are
$n placeholders; nothing is ever formatted in but vmpool.store.lease_sql's
fixed fragments."""

from vmpool.store.lease_sql import (
    INSERT_LEASE,
    LEASE_FIELDS,
    QUEUED_WITH_POSITION,
    end_leases,
    pick_and_claim,
)

# Lease the oldest free instances of a pool to a batch of requests, in one
# statement ($2 = how many; request i gets the i-th claimed instance).
CLAIM_FREE = f"""
WITH {pick_and_claim(limit="$2", at="$5")}, req AS (
    SELECT * FROM unnest($3::text[], $4::timestamptz[], $6::text[], $7::text[], $8::int[],
                         $9::smallint[])
        WITH ORDINALITY AS r(tag, expires, principal, owner, lease_limit, round_ns, n)
), leased AS (
    {INSERT_LEASE}
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
CLAIM_OR_ENQUEUE = f"""
WITH open AS (
    SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM pools WHERE name = $1 AND drained)
), {pick_and_claim(limit="1", at="$4")}, lease AS (
    {INSERT_LEASE}
    SELECT name, pool, $2, $3, $4, $5, $11, zone, $7, $8, $10 FROM claimed
    RETURNING {LEASE_FIELDS}
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
SERVE_RESERVED = f"""
WITH r AS (
    DELETE FROM reservations r USING instances i
    WHERE r.id = $1 AND NOT r.served AND i.name = r.instance AND i.state = 'reserved'
    RETURNING r.instance, r.pool, r.service_tag, r.enqueued_at, r.principal, r.owner
), claimed AS (
    UPDATE instances i SET state = 'leased', reservation_id = NULL, state_changed_at = $2
    FROM r WHERE i.name = r.instance
    RETURNING i.name, i.pool, i.zone, r.service_tag, r.principal, r.owner
)
{INSERT_LEASE}
SELECT name, pool, service_tag, $1, $2, $3, $4, zone, principal, owner, $5 FROM claimed
RETURNING {LEASE_FIELDS}, (SELECT enqueued_at FROM r) AS enqueued_at
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

# A waiting call's recheck of a reservation it found queued with nothing set
# aside (its owner, tag and pool were checked then), in one statement: keep it
# alive ($2: the new expiry, as TOUCH_RESERVATION) and read its place (as
# QUEUE_POSITION). No row for anything else (served, set aside, gone, its pool
# no longer RUNNING): the caller looks again the long way.
POLL_QUEUED = """
WITH kept AS (
    UPDATE reservations r SET expires_at = greatest(r.expires_at, $2)
    WHERE r.id = $1 AND NOT r.served AND r.instance IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM pools p WHERE p.name = r.pool AND p.desired_status <> 'RUNNING')
    RETURNING r.pool, r.seq
)
SELECT count(*) FILTER (WHERE q.seq <= k.seq) AS position, count(*) AS length
FROM kept k JOIN reservations q ON q.pool = k.pool AND NOT q.served
GROUP BY k.seq
"""

QUEUE_POSITION = """
SELECT count(*) FILTER (WHERE seq <= $2) AS position, count(*) AS length
FROM reservations WHERE pool = $1 AND NOT served
"""

# End a batch of leases ($1 instances, $2 their service_tags, $5 principals)
# and mark their VMs for destruction. A request whose owner does not match
# ends nothing.
_RETURNED = """SELECT l.instance FROM leases l JOIN req r
        ON l.instance = r.instance AND l.service_tag = r.tag AND l.principal = r.principal
    ORDER BY l.instance
    FOR UPDATE OF l"""
# Ended by its owner: the caller, whose principal the join matched.
_END_RETURNED = end_leases(
    _RETURNED, at="$3", end_reason="'returned'", destroy_reason="'returned'", ended_by="principal"
)
RETURN_LEASES = f"""
WITH req AS (
    SELECT * FROM unnest($1::text[], $2::text[], $5::text[]) AS r(instance, tag, principal)
), {_END_RETURNED}
SELECT instance, service_tag, principal, pool, leased_at,
       (SELECT pg_notify('vmpool_wake', 'return') WHERE $4) AS notified
FROM ended
"""

# An operator ($4) ends one lease ($1) for a reason ($3); its VM is destroyed.
_END_FORCED = end_leases(
    "SELECT instance FROM leases WHERE instance = $1 FOR UPDATE",
    at="$2",
    end_reason="$3",
    destroy_reason="$3",
    ended_by="$4",
)
FORCE_RETURN = f"""
WITH {_END_FORCED}
SELECT pool, leased_at, service_tag, principal, pg_notify('vmpool_wake', 'return'),
       set_config('vmpool.principal', $4, true) AS cause  -- the lease event's cause
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

GET_LEASE = f"SELECT {LEASE_FIELDS} FROM leases WHERE instance = $1"

LOCK_LEASE = GET_LEASE + " FOR UPDATE"

SET_EXPIRY = f"""
UPDATE leases SET expires_at = $2, expires_round_ns = $3 WHERE instance = $1
RETURNING {LEASE_FIELDS}
"""

FREE_COUNTS = """
SELECT pool, count(*) AS free FROM instances WHERE state = 'ready' GROUP BY pool
"""

POOL_DESIRED_STATUS = "SELECT desired_status FROM pools WHERE name = $1"

# Withdraw a queued reservation of this service_tag ($2) and principal ($4); the
# instance set aside for it (if any) is free again, first in line (its ready_at
# is kept), and the reconciler is woken to hand it to the next reservation.
# One owner's queued reservations ($2 principal, $3 tag), each with its place in
# the whole queue of its pool.
LIST_OWN_RESERVATIONS = f"""
SELECT * FROM ({QUEUED_WITH_POSITION}) q
WHERE principal = $2 AND service_tag = $3 ORDER BY pool, seq
"""

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
