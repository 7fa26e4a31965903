-- The quota triggers of 0030 ran their PL/pgSQL function for every lease and
-- reservation inserted, also with no quota (limit 0), the common case: a WHEN
-- clause skips the call unless the row carries a limit. The functions and
-- what they check are unchanged.
DROP TRIGGER leases_quota ON leases;
CREATE TRIGGER leases_quota BEFORE INSERT ON leases
    FOR EACH ROW WHEN (NEW.lease_limit > 0) EXECUTE FUNCTION vmpool_lease_quota();

DROP TRIGGER reservations_queue_quota ON reservations;
CREATE TRIGGER reservations_queue_quota BEFORE INSERT ON reservations
    FOR EACH ROW WHEN (NOT NEW.served AND NEW.queue_limit > 0)
    EXECUTE FUNCTION vmpool_queue_quota();
