"""The provider's view next to the rows, once a pass when there is work or a
resync is due: boots done or failed, deletions confirmed, VMs that vanished,
orphans (VMs with no row) and drift. The decisions are vmpool.domain.planner's
``plan_rows``; the executor applies them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime

from vmpool.control.executor import Executor
from vmpool.core.backoff import Monotonic
from vmpool.domain.planner import VM, PoolTarget, Row, orphans_seen, plan_rows
from vmpool.providers.base import Provider, VMPhase, VMStatus
from vmpool.providers.errors import ProviderError
from vmpool.store.inventory import Inventory, Summary

RESYNC = 30.0  # seconds between full comparisons of rows and VMs (drift)


class VMView(Mapping[str, VM]):
    """The provider's statuses as the planner's VMs, each converted when it is
    looked up: a pass between resyncs looks up only its few work rows, not every
    VM (with 10,000 VMs converting all took most of the background thread's time
    and, through the GIL, doubled a Lease's latency)."""

    def __init__(self, statuses: Mapping[str, VMStatus]) -> None:
        self._statuses = statuses
        self._vms: dict[str, VM] = {}

    def __getitem__(self, name: str) -> VM:
        vm = self._vms.get(name)
        if vm is None:
            s = self._statuses[name]
            vm = self._vms[name] = VM(
                name,
                ready=s.phase is VMPhase.READY,
                failed=s.phase is VMPhase.FAILED,
                deleting=s.deleting,
                zone=s.zone,
                reason=s.reason,
            )
        return vm

    def __contains__(self, name: object) -> bool:
        return name in self._statuses

    def __iter__(self) -> Iterator[str]:
        return iter(self._statuses)

    def __len__(self) -> int:
        return len(self._statuses)


class ProviderSync:
    def __init__(
        self, inventory: Inventory, provider: Provider, executor: Executor, monotonic: Monotonic
    ) -> None:
        self._inv = inventory
        self._provider = provider
        self._exec = executor
        self._mono = monotonic
        #: False from a failed look at the provider until the next good one.
        self.usable = True
        #: the provider said something changed (a watch event, a deletion)
        self.changed = True
        self._last_resync = -1e9
        self._seen: set[str] = set()  # VM names in the previous observation

    def forget(self) -> None:
        """No longer leader: the next look (if we lead again) is a full one."""
        self._seen.clear()
        self._last_resync = -1e9

    def _due(self) -> bool:
        # Orphans are deleted after orphan_grace: compare often enough for that.
        every = min(RESYNC, max(1.0, self._provider.orphan_grace.total_seconds() / 2))
        return self._mono() - self._last_resync >= every

    def resync_soon(self) -> None:
        """Compare every row with every VM on the next look (drift, orphans)."""
        self._last_resync = -1e18

    def needed(self, summary: Summary) -> bool:
        busy = self._exec.work_pending or any(
            p.counts["provisioning"] or p.counts["destroying"] for p in summary.pools.values()
        )
        return busy or self._due() or self.changed

    async def sync(self, now: datetime, targets: Mapping[str, PoolTarget]) -> bool:
        """Compare rows with VMs: boots done or failed, deletions confirmed, drift."""
        full = self._due()
        try:
            statuses = await self._provider.observe(full=full)
        except ProviderError:
            self.usable = False  # health: vmpool.provider NOT_SERVING
            raise
        self.usable = True
        if statuses is None:
            return False  # the provider's view is not complete yet
        self.changed = False
        vms = VMView(statuses)
        # VMs that were there last time and are not now: gone behind our back,
        # or deletions we asked for. Checked at once, not at the next resync.
        disappeared = self._seen - statuses.keys()
        self._seen = set(statuses)
        rows = await self._inv.work_rows(everything=full)
        self._exec.work_pending = any(r.state in ("provisioning", "destroying") for r in rows)
        if full:
            self._last_resync = self._mono()
            self._exec.orphans = orphans_seen((r.name for r in rows), vms, self._exec.orphans, now)
        elif disappeared:
            rows += await self._inv.rows_named(sorted(disappeared))
        pool_of = {r.name: r.pool for r in rows}
        actions = plan_rows(
            [
                Row(r.name, r.pool, r.state, r.created_at, r.spec_hash, r.destroy_reason)
                for r in rows
            ],
            vms,
            targets,
            now,
            busy=self._exec.busy,
            orphans_since=self._exec.orphans if full else None,
            orphan_grace=self._provider.orphan_grace,
            disappeared=frozenset(disappeared),
        )
        return await self._exec.apply_rows(actions, pool_of, now)
