-- Leadership with a term (fencing). One row: who leads, in which term, and
-- until when. A follower takes the row over (term + 1) only once expires_at
-- has passed; the leader renews it every reconcile interval and releases it
-- (expires_at = now()) after its background work has stopped. Every write of
-- the reconciler first locks this row FOR SHARE with its holder and term, so
-- once a new term begins the old leader's writes find nothing and fail.
CREATE TABLE leader (
    id          int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    holder      text NOT NULL,
    term        bigint NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
