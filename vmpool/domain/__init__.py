"""The rules, as pure functions: leasing, pools, the reconciler's planner."""
