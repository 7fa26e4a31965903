-- Pools created through VMPoolService live beside the config pools, in one
-- namespace (pool-api.md section 2). Every pool has a desired status (the
-- last user action); `drained` becomes "not RUNNING", so every claim that
-- already refuses a drained pool refuses a paused, stopped or deleting one.
ALTER TABLE pools
    ADD COLUMN source text NOT NULL DEFAULT 'config' CHECK (source IN ('config', 'api')),
    ADD COLUMN desired_status text NOT NULL DEFAULT 'RUNNING'
        CHECK (desired_status IN ('RUNNING', 'PAUSED', 'STOPPED', 'DELETED')),
    -- Reached min_ready once since created or resumed (INITIALIZING -> RUNNING).
    ADD COLUMN reached_running boolean NOT NULL DEFAULT true,
    -- API pools: the spec, resolved and pinned at create time.
    ADD COLUMN runtime text NOT NULL DEFAULT '',
    ADD COLUMN intrinsic_os text NOT NULL DEFAULT '',
    ADD COLUMN hardware_template text NOT NULL DEFAULT '',
    ADD COLUMN pool_tier text NOT NULL DEFAULT '',
    ADD COLUMN owner text NOT NULL DEFAULT '',
    ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();

-- An operator's drain carries over as a stop.
UPDATE pools SET desired_status = 'STOPPED' WHERE drained;
ALTER TABLE pools DROP COLUMN drained;
ALTER TABLE pools ADD COLUMN drained boolean
    GENERATED ALWAYS AS (desired_status <> 'RUNNING') STORED;
