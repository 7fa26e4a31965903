"""Readiness as a grpc.health.v1 service name, for Kubernetes' native gRPC probe
(`grpc: {port, service: vmpool.ready}`): SERVING while this process takes calls
and its database answers. Liveness stays on the empty name, which never looks
at the database (a database outage must not restart every replica)."""

from __future__ import annotations

from collections.abc import Callable

from grpclib.health.check import CheckBase, ServiceCheck

from vmpool.services.dbhealth import DatabaseHealth
from vmpool.store.errors import StoreUnavailable

READY = "vmpool.ready"
#: SERVING unless this process leads and cannot use its provider (VM backend):
#: for alerts and dashboards, not for a Kubernetes probe (leases of free
#: instances still work, and restarting would not fix the backend).
PROVIDER = "vmpool.provider"


class HealthName:
    """A name for grpclib's Health service to report on (it reads the name
    from a servable's method paths)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __mapping__(self) -> dict[str, object]:
        return {f"/{self._name}/Check": None}


def database_check(db: DatabaseHealth) -> CheckBase:
    async def reachable() -> bool:
        try:
            await db.check()
        except StoreUnavailable:
            return False  # not an error to log with a traceback: readiness says it
        return True

    return ServiceCheck(reachable, check_ttl=1.0, check_timeout=2.0)


def provider_check(usable: Callable[[], bool]) -> CheckBase:
    async def check() -> bool:
        return usable()

    return ServiceCheck(check, check_ttl=1.0, check_timeout=1.0)
