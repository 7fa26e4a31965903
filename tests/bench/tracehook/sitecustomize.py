"""Loaded by the server of `python -m tests.bench.watch_trace` (through
PYTHONPATH): timestamps along an event's way through the server."""

from tests.bench.watch_trace import install

install()
