-- Whether the holder of the term also holds the advisory lock on its control
-- session. Getting that lock proves the last leader's session gone only if
-- that leader held it: a leader that took an expired term without it (its
-- predecessor was frozen, still holding the lock) must not lose its live term
-- to whoever gets the lock next.
ALTER TABLE leader ADD COLUMN locked boolean NOT NULL DEFAULT true;
