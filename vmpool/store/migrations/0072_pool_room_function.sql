-- The room left in pool p under max_size m (its rows that are not
-- destroying), counted after taking the pool row's lock. Inserts into one
-- pool take turns on that lock, and the count is a statement of its own in a
-- VOLATILE function, so under READ COMMITTED it sees the rows of an insert it
-- waited for. This lets the reconciler add instances in one statement that
-- also carries the leader's fence (0071): one round trip in autocommit instead
-- of BEGIN, the lock, the insert and COMMIT. The two ways take the same lock,
-- so processes of the previous version still take turns with this one.
CREATE FUNCTION vmpool_pool_room(p text, m int) RETURNS int
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM 1 FROM pools WHERE name = p FOR NO KEY UPDATE;
    RETURN m - (SELECT count(*) FROM instances WHERE pool = p AND state <> 'destroying');
END
$$;
