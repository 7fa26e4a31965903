-- The leader's last decision per autoscaled pool with its inputs (issue 24),
-- for PoolStats and `vmpool status` on any replica.
ALTER TABLE autoscale_state ADD COLUMN decision jsonb NOT NULL DEFAULT '{}';
