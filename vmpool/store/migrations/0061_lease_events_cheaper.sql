-- Lease events, cheaper to record and quicker to serve (issue 20, item 6;
-- docs/performance.md "Lease events").
--
-- 1. Position: greatest(own xid, the snapshot's latest completed xid) instead
--    of greatest(own xid, snapshot xmax). xmax is one past the latest
--    completed xid, often a transaction id nobody had taken yet, so an event
--    waited for the next writer to start and finish before the readers'
--    xmin passed it. The order argument is unchanged: a transaction that saw
--    another's commit sees an xid at least as high as that one's position.
-- 2. NOTIFY: not for the Lease/Return/Extend path (leased, extended,
--    returned). A NOTIFY serialises the commits that send one and wakes every
--    listening session of the database; per Lease or Return it more than
--    doubled PostgreSQL's CPU. The process that made such a change wakes its
--    own reader in memory; other replicas' readers poll while they have
--    streams (services/lease_events.py). The reconciler's and operators'
--    changes (expired, stopped, vanished, released, reservations) still
--    NOTIFY.
CREATE OR REPLACE FUNCTION vmpool_event_pos() RETURNS xid8 LANGUAGE sql VOLATILE AS $$
    SELECT greatest(
        pg_current_xact_id(),
        (pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1)::text::xid8
    )
$$;

CREATE OR REPLACE FUNCTION vmpool_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    loud bigint := 0;
    who text := nullif(current_setting('vmpool.principal', true), '');
    why text := nullif(current_setting('vmpool.reason', true), '');
BEGIN
    IF TG_TABLE_NAME = 'leases' AND TG_OP = 'INSERT' THEN
        INSERT INTO lease_events (pos, kind, instance, pool, service_tag, principal, cause,
                                  reservation_id, expires_at, expires_round_ns)
        SELECT vmpool_event_pos(), 'leased', instance, pool, service_tag, principal, principal,
               reservation_id, expires_at, expires_round_ns
        FROM new_rows ORDER BY instance;
    ELSIF TG_TABLE_NAME = 'leases' AND TG_OP = 'UPDATE' THEN
        INSERT INTO lease_events (pos, kind, instance, pool, service_tag, principal, cause,
                                  reservation_id, expires_at, expires_round_ns)
        SELECT vmpool_event_pos(), 'extended', n.instance, n.pool, n.service_tag, n.principal,
               vmpool_event_cause(n.principal), n.reservation_id, n.expires_at, n.expires_round_ns
        FROM new_rows n JOIN old_rows o USING (instance)
        WHERE (n.expires_at, n.expires_round_ns) IS DISTINCT FROM (o.expires_at, o.expires_round_ns)
        ORDER BY n.instance;
    ELSIF TG_TABLE_NAME = 'leases' THEN
        WITH written AS (
        -- Why a lease ended is in the lease_history row the same statement
        -- wrote; none: undone because its caller was gone (UNCLAIM), released.
        INSERT INTO lease_events (pos, kind, instance, pool, service_tag, principal, cause,
                                  reservation_id, expires_at, expires_round_ns, reason)
        SELECT vmpool_event_pos(),
               CASE
                   WHEN h.id IS NULL THEN 'released'
                   WHEN h.end_reason = 'returned' THEN 'returned'
                   WHEN h.end_reason = 'expired' THEN 'expired'
                   WHEN h.end_reason = 'vm vanished' THEN 'vanished'
                   ELSE 'stopped'
               END,
               o.instance, o.pool, o.service_tag, o.principal,
               CASE
                   WHEN h.end_reason IN ('expired', 'vm vanished') THEN 'vmpool:reconciler'
                   WHEN h.id IS NULL THEN 'vmpool:server'
                   ELSE vmpool_event_cause(o.principal)
               END,
               o.reservation_id, o.expires_at, o.expires_round_ns, coalesce(h.end_reason, 'caller gone')
        FROM old_rows o
        LEFT JOIN LATERAL (
            SELECT id, end_reason FROM lease_history
            WHERE instance = o.instance AND leased_at = o.leased_at
            ORDER BY id DESC LIMIT 1
        ) h ON true
        ORDER BY o.instance
        RETURNING kind
        )
        SELECT count(*) FILTER (WHERE kind <> 'returned') INTO loud FROM written;
    ELSIF TG_OP = 'INSERT' THEN
        -- A reservation joins the queue (one served at once has only its lease's event).
        INSERT INTO lease_events (pos, kind, pool, service_tag, principal, cause,
                                  reservation_id, expires_at)
        SELECT vmpool_event_pos(), 'reservation_queued', pool, service_tag, principal, principal,
               id, expires_at
        FROM new_rows WHERE NOT served ORDER BY seq;
        GET DIAGNOSTICS loud = ROW_COUNT;
    ELSE
        -- A queued reservation leaves the queue: served (its lease exists now),
        -- cancelled (a caller said so), or expired / dropped by the reconciler
        -- (EXPIRE_RESERVATIONS sets vmpool.reason = 'expired').
        INSERT INTO lease_events (pos, kind, instance, pool, service_tag, principal, cause,
                                  reservation_id, expires_at, expires_round_ns, reason)
        SELECT vmpool_event_pos(),
               CASE
                   WHEN l.instance IS NOT NULL THEN 'reservation_served'
                   WHEN who IS NOT NULL THEN 'reservation_cancelled'
                   WHEN why = 'expired' THEN 'reservation_expired'
                   WHEN why IS NULL AND o.expires_at <= clock_timestamp() THEN 'reservation_expired'
                   ELSE 'reservation_cancelled'
               END,
               coalesce(l.instance, ''), o.pool, o.service_tag, o.principal,
               CASE
                   WHEN l.instance IS NOT NULL THEN o.principal
                   ELSE coalesce(who, 'vmpool:reconciler')
               END,
               o.id,
               coalesce(l.expires_at, o.expires_at), coalesce(l.expires_round_ns, 0),
               CASE
                   WHEN l.instance IS NOT NULL OR who IS NOT NULL THEN ''
                   WHEN why = 'expired' THEN 'not renewed in time'
                   WHEN why IS NULL AND o.expires_at <= clock_timestamp() THEN 'not renewed in time'
                   ELSE 'queue dropped'
               END
        FROM old_rows o LEFT JOIN leases l ON l.reservation_id = o.id
        WHERE NOT o.served
        ORDER BY o.seq;
        GET DIAGNOSTICS loud = ROW_COUNT;
    END IF;
    IF loud > 0 THEN
        PERFORM pg_notify('vmpool_events', '');
    END IF;
    RETURN NULL;
END
$$;
