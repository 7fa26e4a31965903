"""Benchmarks: `python -m tests.bench [--quick]` (see docs/performance.md)."""
