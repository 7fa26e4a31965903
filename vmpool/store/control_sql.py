"""The statements of leadership and wake-ups (vmpool.store.control); the fence
every reconciler write starts with. Parameters are $n placeholders."""

import re

# Take the leader row ($1 holder, $2 ttl seconds) if it has expired, is our
# own from before a lost connection, or ($3) we have just got the advisory lock
# that every leader holds on its control connection and the holder held it
# (`locked`): then the last leader's session is gone (a killed leader is
# replaced at once, not after its ttl). $4: we hold the lock now. The first
# row ever needs the lock too, so a process of this version never leads beside
# one of the previous version (which led by that lock alone). Always a new
# term, so writes checked against an older term fail. Times are the
# database's: the replicas' clocks do not matter.
LEADER_ACQUIRE = """
WITH taken AS (
    UPDATE leader SET holder = $1, term = term + 1, renewed_at = now(),
                      expires_at = now() + make_interval(secs => $2), locked = $4
    WHERE id = 1 AND (expires_at <= now() OR holder = $1 OR ($3::bool AND locked))
    RETURNING term
), first AS (
    INSERT INTO leader (id, holder, term, renewed_at, expires_at, locked)
    SELECT 1, $1, 1, now(), now() + make_interval(secs => $2), true
    WHERE $4::bool AND NOT EXISTS (SELECT 1 FROM leader)
    ON CONFLICT (id) DO NOTHING
    RETURNING term
)
SELECT term FROM taken UNION ALL SELECT term FROM first
"""

# A process that never reconciles (role api) wakes the leader's reconciler.
WAKE = "SELECT pg_notify('vmpool_wake', $1)"

# The same key as the previous version's leader lock.
LEADER_LOCK = "SELECT pg_try_advisory_lock(33334376925195265)"
LEADER_UNLOCK = "SELECT pg_advisory_unlock(33334376925195265)"

# The leader extends its term ($3 ttl seconds; $4 whether it holds the lock
# now); nothing if the term is over.
LEADER_RENEW = """
UPDATE leader SET renewed_at = now(), expires_at = now() + make_interval(secs => $3),
                  locked = $4
WHERE id = 1 AND holder = $1 AND term = $2 AND expires_at > now()
RETURNING term
"""

# Step down: a follower may take over at once.
LEADER_RELEASE = """
UPDATE leader SET expires_at = now() WHERE id = 1 AND holder = $1 AND term = $2
"""

# The fence: the first statement of every reconciler write transaction. The
# share lock keeps a takeover (an UPDATE of this row) waiting until the write
# commits; after a takeover it finds nothing, and the write is refused.
LEADER_FENCE = """
SELECT term FROM leader
WHERE id = 1 AND holder = $1 AND term = $2 AND expires_at > now()
FOR SHARE
"""

# The fence inside a write's own statement (migration 0071's vmpool_fence):
# one round trip and one implicit transaction instead of BEGIN, the fence, the
# write and COMMIT. The fence is a one-time filter evaluated before the write
# runs; the write (a data-modifying CTE) always runs to completion, and when
# the fence raises (VPL01) the whole statement changes nothing. The write may
# have a WITH of its own only if that WITH does not modify data.
NOT_LEADER_STATE = "VPL01"
_PARAM = re.compile(r"\$(\d+)")


def with_fence(query: str) -> str:
    """``query`` (a write with RETURNING) with the fence's holder and term as its
    two parameters after its own."""
    n = max((int(m) for m in _PARAM.findall(query)), default=0)
    return (
        f"WITH vmpool_fence AS MATERIALIZED (SELECT vmpool_fence(${n + 1}, ${n + 2}) AS ok),\n"
        f"vmpool_write AS ({query.strip()})\n"
        "SELECT * FROM vmpool_write WHERE (SELECT ok FROM vmpool_fence)"
    )
