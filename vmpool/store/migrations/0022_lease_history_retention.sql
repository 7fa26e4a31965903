-- Retention: the leader deletes lease_history rows older than
-- reconciler.lease_history_retention, oldest first, in batches.
CREATE INDEX lease_history_ended ON lease_history (ended_at, id);
