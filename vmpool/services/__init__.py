"""The rules applied to the store: the leaser, the pool catalog, waiters, health."""
