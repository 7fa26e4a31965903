"""The audit trail: one line per state change on the logger ``vmpool.audit``.

Calls get theirs from the per-call wrapper (vmpool.api.rpc); what the
reconciler does on its own (a lease expired, a leased VM vanished) is audited
here, under the fixed principal RECONCILER (docs/security.md, "Audit")."""

from __future__ import annotations

import structlog

audit_log = structlog.get_logger("vmpool.audit")

#: The principal of what the reconciler does by itself: in lease_history.ended_by,
#: audit lines and lease events' cause.
RECONCILER = "vmpool:reconciler"


def lease_ended(
    action: str, *, instance: str, pool: str, service_tag: str, owner: str, reason: str
) -> None:
    """The audit line of a lease the reconciler ended (``owner``: its principal)."""
    lease = {"instance": instance, "pool": pool, "service_tag": service_tag, "owner": owner}
    audit_log.info(
        "audit", action=action, outcome="ok", principal=RECONCILER, reason=reason, **lease
    )
