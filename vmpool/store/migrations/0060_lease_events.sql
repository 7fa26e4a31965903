-- Lease events (issue 20, docs/api.md "WatchLeases"): one row per change of a
-- lease or a queued reservation, written by the triggers below in the
-- transaction that makes the change (a rollback leaves no event). Statement
-- triggers with transition tables: a batched Lease or Return of N rows costs
-- one trigger call and one INSERT, not N.
--
-- Order: (pos, seq). pos is at least the writer's own transaction id and at
-- least the xmax of the snapshot the trigger runs under, so an event is
-- ordered after every event whose transaction had committed before it was
-- written (a change that saw another comes after it). Readers serve only
-- events with pos below their snapshot's xmin: every transaction that could
-- still write a smaller pos has finished, so a cursor is final.
CREATE SEQUENCE lease_events_seq;

CREATE TABLE lease_events (
    pos               xid8 NOT NULL,
    seq               bigint NOT NULL DEFAULT nextval('lease_events_seq'),
    txid              xid8 NOT NULL DEFAULT pg_current_xact_id(),  -- for snapshot streams
    at                timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind              text NOT NULL,
    instance          text NOT NULL DEFAULT '',
    pool              text NOT NULL,
    service_tag       text NOT NULL,
    principal         text NOT NULL,          -- the lease's or reservation's owner
    cause             text NOT NULL,          -- who made it happen
    reservation_id    uuid,
    expires_at        timestamptz,
    expires_round_ns  smallint NOT NULL DEFAULT 0,
    reason            text NOT NULL DEFAULT '',
    PRIMARY KEY (pos, seq)
);

-- Everything at or before this position has been pruned (retention): a cursor
-- before it gets OUT_OF_RANGE.
CREATE TABLE lease_events_horizon (
    id   int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    pos  xid8 NOT NULL,
    seq  bigint NOT NULL
);
INSERT INTO lease_events_horizon VALUES (1, '0', 0);

-- Who caused a change, when the statement says (StopLease: the operator;
-- CancelReservation: the caller): set_config('vmpool.principal', ..., true).
-- Unset: the owner for client calls, the reconciler for the rest.
CREATE FUNCTION vmpool_event_pos() RETURNS xid8 LANGUAGE sql VOLATILE AS $$
    SELECT greatest(pg_current_xact_id(), pg_snapshot_xmax(pg_current_snapshot()))
$$;

CREATE FUNCTION vmpool_event_cause(fallback text) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('vmpool.principal', true), ''), fallback)
$$;

-- One trigger function for every change: the branch is the table and the
-- operation; a statement that wrote events NOTIFYs the readers (delivered at
-- commit, folded into one per transaction).
CREATE FUNCTION vmpool_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    written bigint := 0;
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
        ORDER BY o.instance;
    ELSIF TG_OP = 'INSERT' THEN
        -- A reservation joins the queue (one served at once has only its lease's event).
        INSERT INTO lease_events (pos, kind, pool, service_tag, principal, cause,
                                  reservation_id, expires_at)
        SELECT vmpool_event_pos(), 'reservation_queued', pool, service_tag, principal, principal,
               id, expires_at
        FROM new_rows WHERE NOT served ORDER BY seq;
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
    END IF;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written > 0 THEN
        PERFORM pg_notify('vmpool_events', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER leases_events_insert AFTER INSERT ON leases
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION vmpool_events();
CREATE TRIGGER leases_events_update AFTER UPDATE ON leases
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION vmpool_events();
CREATE TRIGGER leases_events_delete AFTER DELETE ON leases
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION vmpool_events();
CREATE TRIGGER reservations_events_insert AFTER INSERT ON reservations
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION vmpool_events();
CREATE TRIGGER reservations_events_delete AFTER DELETE ON reservations
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION vmpool_events();
