-- The fake provider's "cloud": simulated VMs that outlive a server crash, as
-- real ones would. Not used by the kubevirt provider.
CREATE TABLE fake_vms (
    name        text PRIMARY KEY,
    pool        text NOT NULL,
    created_at  timestamptz NOT NULL,
    ready_at    timestamptz NOT NULL,
    fails       boolean NOT NULL DEFAULT false,
    zone        text NOT NULL DEFAULT ''
);
