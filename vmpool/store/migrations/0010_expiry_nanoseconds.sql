-- Lease expiries to the nanosecond. timestamptz keeps microseconds, so
-- leases.expires_at holds the expiry rounded UP to the microsecond (every SQL
-- comparison with a microsecond clock, `expires_at <= now`, stays exact and
-- keeps using leases_expiry), and expires_round_ns how many nanoseconds the
-- exact expiry lies before it (0..999). Existing rows were written to the
-- microsecond, so 0 is exactly right for them.
ALTER TABLE leases
    ADD COLUMN expires_round_ns smallint NOT NULL DEFAULT 0
        CHECK (expires_round_ns BETWEEN 0 AND 999);
