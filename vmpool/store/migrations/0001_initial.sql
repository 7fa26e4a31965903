-- Pools known to the service: configured ones, and removed ones still draining.
CREATE TABLE pools (
    name        text PRIMARY KEY,
    labels      jsonb NOT NULL DEFAULT '{}',
    configured  boolean NOT NULL DEFAULT true,   -- present in the leader's config
    drained     boolean NOT NULL DEFAULT false,  -- drained by an operator
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per VM, written before the VM is created and removed only after the
-- provider confirms the VM is gone.
CREATE TABLE instances (
    name              text PRIMARY KEY,
    pool              text NOT NULL REFERENCES pools (name),
    state             text NOT NULL
        CHECK (state IN ('provisioning', 'ready', 'reserved', 'leased', 'destroying')),
    zone              text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL,
    ready_at          timestamptz,
    state_changed_at  timestamptz NOT NULL,
    reservation_id    uuid,                      -- set aside for this reservation
    destroy_reason    text,
    CHECK ((state = 'reserved') = (reservation_id IS NOT NULL))
);
-- The lease hot path: the oldest free instance of a pool.
CREATE INDEX instances_free ON instances (pool, ready_at, name) WHERE state = 'ready';
-- Per-pool counts for the reconciler's event-driven passes.
CREATE INDEX instances_pool_state ON instances (pool, state);
-- The reconciler's work lists.
CREATE INDEX instances_busy ON instances (state, created_at)
    WHERE state IN ('provisioning', 'destroying');
CREATE UNIQUE INDEX instances_reservation ON instances (reservation_id)
    WHERE reservation_id IS NOT NULL;

-- Active leases; a row moves to lease_history when the lease ends.
CREATE TABLE leases (
    instance        text PRIMARY KEY REFERENCES instances (name),
    pool            text NOT NULL,
    service_tag     text NOT NULL,
    reservation_id  uuid UNIQUE,                 -- a reservation is served at most once
    leased_at       timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    zone            text NOT NULL DEFAULT ''
);
CREATE INDEX leases_expiry ON leases (expires_at);

-- Reservations, FIFO by seq. A queued one leaves this table when it is
-- served; its id stays on the lease (and then in lease_history). One served at
-- once (a new id with a free instance) is kept briefly as `served`: the
-- primary key is what makes two concurrent first uses of one id collide.
CREATE TABLE reservations (
    id           uuid PRIMARY KEY,
    seq          bigserial NOT NULL,
    pool         text NOT NULL,
    service_tag  text NOT NULL,
    enqueued_at  timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    served       boolean NOT NULL DEFAULT false,
    instance     text UNIQUE                     -- set aside for it
);
-- The set-aside hot path: the oldest reservation still waiting for an instance.
CREATE INDEX reservations_waiting ON reservations (pool, seq)
    WHERE instance IS NULL AND NOT served;
CREATE INDEX reservations_queue ON reservations (pool, seq) WHERE NOT served;
CREATE INDEX reservations_expiry ON reservations (expires_at);

CREATE TABLE lease_history (
    id              bigserial PRIMARY KEY,
    instance        text NOT NULL,
    pool            text NOT NULL,
    service_tag     text NOT NULL,
    reservation_id  uuid,
    leased_at       timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    ended_at        timestamptz NOT NULL,
    end_reason      text NOT NULL,
    zone            text NOT NULL DEFAULT ''
);
CREATE INDEX lease_history_reservation ON lease_history (reservation_id)
    WHERE reservation_id IS NOT NULL;
CREATE INDEX lease_history_instance ON lease_history (instance);
