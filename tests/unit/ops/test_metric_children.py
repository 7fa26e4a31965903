"""Children looked up once (ops.metrics.Children) count into the same series
as prometheus-client's labels(), per label values."""

from __future__ import annotations

from prometheus_client import generate_latest

from vmpool.ops.metrics import Metrics


def test_cached_children_count_into_the_labelled_series() -> None:
    m = Metrics()
    for _ in range(3):
        m.rpc_requests_by("Lease", "OK").inc()
    m.rpc_requests_by("Lease", "RESOURCE_EXHAUSTED").inc()
    m.rpc_requests.labels("Lease", "OK").inc()
    m.lease_duration_by("bench", "returned").observe(2.0)
    text = generate_latest(m.registry).decode()
    assert 'vmpool_rpc_requests_total{code="OK",method="Lease"} 4.0' in text
    assert 'vmpool_rpc_requests_total{code="RESOURCE_EXHAUSTED",method="Lease"} 1.0' in text
    assert 'vmpool_lease_duration_seconds_count{pool="bench",reason="returned"} 1.0' in text
    assert m.leases_granted_by("a") is m.leases_granted_by("a")
    assert m.leases_granted_by("a") is not m.leases_granted_by("b")
