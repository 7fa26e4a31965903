-- Adaptive warm pools (issue 24). Lease attempts per pool and second, added
-- by every replica (one batched statement a second at most, only when there
-- were any) and read by the leader; kept for the longest demand window.
CREATE TABLE autoscale_arrivals (
    pool text NOT NULL,
    second bigint NOT NULL,  -- seconds since the epoch (UTC)
    n integer NOT NULL CHECK (n > 0),
    PRIMARY KEY (pool, second)
);

-- What the leader learned per pool, so a restart or a new leader goes on:
-- the desired S, when it last rose, recent boot times and the daily profile.
CREATE TABLE autoscale_state (
    pool text PRIMARY KEY,
    s integer NOT NULL,
    hold integer NOT NULL,
    raised_at double precision,  -- seconds since the epoch; NULL: never
    boots double precision[] NOT NULL,
    profile_days integer[] NOT NULL,
    profile jsonb NOT NULL,  -- one list of per-bin peaks per entry of profile_days
    updated_at timestamptz NOT NULL DEFAULT now()
);
