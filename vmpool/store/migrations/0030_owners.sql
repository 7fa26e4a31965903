-- Ownership and quotas (identity.md sections 3 and 5). A lease or reservation
-- records who made it: the principal (authenticated name, or 'anonymous') and,
-- as before, the service_tag. `owner` is what quotas count: the principal, or
-- with no authentication the service_tag. The limit a row was admitted under
-- travels with it (0: none), so the checks below run inside the very statement
-- that would exceed a quota, whichever replica runs it.
ALTER TABLE leases
    ADD COLUMN principal text NOT NULL DEFAULT 'anonymous',
    ADD COLUMN owner text NOT NULL DEFAULT '',
    ADD COLUMN lease_limit integer NOT NULL DEFAULT 0;
UPDATE leases SET owner = service_tag;
CREATE INDEX leases_owner ON leases (owner);

ALTER TABLE reservations
    ADD COLUMN principal text NOT NULL DEFAULT 'anonymous',
    ADD COLUMN owner text NOT NULL DEFAULT '',
    ADD COLUMN queue_limit integer NOT NULL DEFAULT 0;
UPDATE reservations SET owner = service_tag;
CREATE INDEX reservations_owner_queue ON reservations (owner, pool) WHERE NOT served;

ALTER TABLE lease_history ADD COLUMN principal text;  -- NULL: not recorded

-- The count runs after a transaction-scoped advisory lock on (owner, pool), in
-- a PL/pgSQL query that takes its own snapshot: a concurrent insert by the same
-- owner either committed before the lock was granted (and is counted) or waits.
CREATE FUNCTION vmpool_queue_quota() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    IF NEW.served OR NEW.queue_limit <= 0 THEN
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('vmpool.queue.' || NEW.pool), hashtext(NEW.owner));
    SELECT count(*) INTO n FROM reservations
    WHERE owner = NEW.owner AND pool = NEW.pool AND NOT served;
    IF n >= NEW.queue_limit THEN
        RAISE EXCEPTION USING
            ERRCODE = 'VPQ01',
            MESSAGE = format('owner "%s" has %s queued reservations in pool "%s", the limit',
                             left(NEW.owner, 64), n, NEW.pool);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER reservations_queue_quota BEFORE INSERT ON reservations
    FOR EACH ROW EXECUTE FUNCTION vmpool_queue_quota();

CREATE FUNCTION vmpool_lease_quota() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    IF NEW.lease_limit <= 0 THEN
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('vmpool.leases'), hashtext(NEW.owner));
    SELECT count(*) INTO n FROM leases WHERE owner = NEW.owner;
    IF n >= NEW.lease_limit THEN
        RAISE EXCEPTION USING
            ERRCODE = 'VPQ02',
            MESSAGE = format('owner "%s" has %s active leases, the limit',
                             left(NEW.owner, 64), n);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER leases_quota BEFORE INSERT ON leases
    FOR EACH ROW EXECUTE FUNCTION vmpool_lease_quota();
