-- Who ended each lease (issue 18): the caller (Return), the operator
-- (VMPoolService.StopLease), or 'vmpool:reconciler' (expiry, a vanished VM).
-- lease_history.principal stays the lease's owner. NULL: ended before this
-- migration.
ALTER TABLE lease_history ADD COLUMN ended_by text;
