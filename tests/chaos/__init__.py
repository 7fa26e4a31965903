"""Chaos scenarios with invariant checks: `python -m tests.chaos [--quick|--long]`.

See docs/chaos.md for the scenarios, the invariants and the last results.
"""
