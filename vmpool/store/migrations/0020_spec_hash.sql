-- Template rollout: the hash of the VM spec each instance was created from.
-- Rows from before this migration get '' (unknown), which is never current, so
-- their free VMs are replaced by the first passes after the upgrade (new first).
ALTER TABLE instances ADD COLUMN spec_hash text NOT NULL DEFAULT '';
