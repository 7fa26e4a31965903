-- The reconciler's fence (0021) as a function, so that a write can carry it
-- in its own statement: one round trip and one implicit transaction instead of
-- BEGIN, the fence, the write and COMMIT (vmpool.store.fence). It share-locks
-- the leader row of this holder and term, so a takeover (an UPDATE of the row)
-- waits until the write commits, or raises VPL01 and the statement changes
-- nothing.
CREATE FUNCTION vmpool_fence(fence_holder text, fence_term bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM 1 FROM leader
    WHERE id = 1 AND holder = fence_holder AND term = fence_term AND expires_at > now()
    FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'not the leader (a newer term began): write refused'
            USING ERRCODE = 'VPL01';
    END IF;
    RETURN true;
END
$$;
