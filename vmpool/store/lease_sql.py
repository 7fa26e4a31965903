"""SQL pieces several statements share: a lease's columns, picking and
claiming a pool's free instances, and ending leases. Parameters are $n
placeholders; only these fixed fragments are ever formatted in."""

# What a lease row says, in the order LeaseRow reads it.
LEASE_FIELDS = (
    "instance, pool, service_tag, reservation_id, leased_at, expires_at, expires_round_ns, zone, "
    "principal"
)

# The head of every insert of a lease (its VALUES or SELECT follow, in this order).
INSERT_LEASE = f"INSERT INTO leases ({LEASE_FIELDS}, owner, lease_limit)"


def pick_and_claim(*, limit: str, at: str) -> str:
    """CTEs ``pick``, ``numbered`` and ``claimed``: the oldest ready instances of
    pool $1, at most ``limit``, locked (skipping those another claim holds),
    leased at ``at``. ``claimed`` returns name, pool, zone and n (1, 2, ...).
    Nobody jumps the queue: while a reservation of the pool waits with nothing
    set aside, free instances are for the reconciler to set aside; nothing is
    claimed in a drained pool."""
    return f"""pick AS MATERIALIZED (
    SELECT name FROM instances
    WHERE pool = $1 AND state = 'ready'
      AND NOT EXISTS (
          SELECT 1 FROM reservations WHERE pool = $1 AND instance IS NULL AND NOT served)
      AND NOT EXISTS (SELECT 1 FROM pools WHERE name = $1 AND drained)
    ORDER BY ready_at, name
    LIMIT {limit}
    FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT name, row_number() OVER (ORDER BY name) AS n FROM pick
), claimed AS (
    UPDATE instances i SET state = 'leased', state_changed_at = {at}
    FROM numbered p WHERE i.name = p.name
    RETURNING i.name, i.pool, i.zone, p.n
)"""


def end_leases(
    locked: str, *, at: str, end_reason: str, destroy_reason: str | None, ended_by: str
) -> str:
    """CTEs ending the leases of the instances ``locked`` selects (it locks
    them, in instance order, so batches and expiries never deadlock): ``ended``
    (the deleted lease rows), ``hist`` (their lease_history rows, ended ``at``
    for ``end_reason`` by ``ended_by``, an SQL expression naming who ended it;
    ``principal`` there is the owner's) and, given a ``destroy_reason``, ``gone``
    (their instances marked destroying)."""
    gone = (
        f""", gone AS (
    UPDATE instances i SET state = 'destroying', destroy_reason = {destroy_reason},
                           state_changed_at = {at}
    FROM ended WHERE i.name = ended.instance
)"""
        if destroy_reason is not None
        else ""
    )
    return f"""locked AS MATERIALIZED (
    {locked}
), ended AS (
    DELETE FROM leases l USING locked WHERE l.instance = locked.instance
    RETURNING l.*
), hist AS (
    INSERT INTO lease_history (instance, pool, service_tag, reservation_id, leased_at,
                               expires_at, ended_at, end_reason, zone, principal, ended_by)
    SELECT instance, pool, service_tag, reservation_id, leased_at, expires_at, {at},
           {end_reason}, zone, principal, {ended_by}
    FROM ended
){gone}"""


# Queued reservations with their place in their pool's queue; the callers add
# WHERE / ORDER BY around it ($1: a pool, '' for every pool).
QUEUED_WITH_POSITION = """SELECT id, pool, service_tag, enqueued_at, expires_at, instance, principal,
       seq, row_number() OVER (PARTITION BY pool ORDER BY seq) AS position
FROM reservations WHERE ($1 = '' OR pool = $1) AND NOT served"""
