"""Observability primitives: logs, metrics, the metrics listener."""
