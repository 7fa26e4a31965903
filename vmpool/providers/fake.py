"""Simulated VMs: boot after ``boot_seconds``, fail at ``failure_rate``.

The VMs live in the database (table fake_vms), so like real ones they survive
a server crash and are shared by every server process. Like a watch cache, the
provider keeps what it knows in memory and re-reads the table when asked for a
full view (and every few seconds), so a busy reconciler pass costs no query.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType

from vmpool.config.schema import FakeProviderConfig, PoolConfig
from vmpool.core.batching import MicroBatcher
from vmpool.core.clock import Clock, utcnow
from vmpool.providers.base import VMDetails, VMPhase, VMStatus
from vmpool.store.fakecloud import FakeCloud, FakeVM

ZONES = ("fake-zone-a", "fake-zone-b", "fake-zone-c")
RELOAD_EVERY = 10.0  # seconds: re-read the table even when no full view is asked for


class FakeProvider:
    def __init__(
        self,
        cloud: FakeCloud,
        config: FakeProviderConfig,
        *,
        clock: Clock = utcnow,
        orphan_grace: timedelta = timedelta(minutes=10),
    ) -> None:
        self._cloud = cloud
        self._config = config
        self._clock = clock
        self._random = random.Random(config.seed)
        self.orphan_grace = orphan_grace
        self._on_change: Callable[[], None] = lambda: None
        self._vms: dict[str, FakeVM] | None = None  # None: not loaded yet
        self._status: dict[str, VMStatus] = {}
        self._pending: dict[str, datetime] = {}  # booting: name -> ready_at
        self._loaded_at = -1e9
        self._creates = MicroBatcher(cloud.create_many)
        self._deletes = MicroBatcher(cloud.delete_many)

    def _fails(self, name: str) -> bool:
        rate = self._config.failure_rate
        if rate <= 0:
            return False
        if self._config.seed is None:
            return self._random.random() < rate
        # Seeded: the same name fails in every process and every run.
        digest = hashlib.sha256(f"{self._config.seed}:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < rate

    async def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change

    async def close(self) -> None:
        return None

    async def create(self, name: str, pool: PoolConfig) -> None:
        now = self._clock()
        zone = ZONES[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(ZONES)]
        ready_at = now + timedelta(seconds=self._config.boot_seconds)
        vm = FakeVM(name, pool.name, now, ready_at, self._fails(name), zone)
        await self._creates.submit(vm)
        if self._vms is not None and name not in self._vms:
            self._remember(vm, now)
        # Like a watch event: tell the reconciler when the boot is done.
        asyncio.get_running_loop().call_later(self._config.boot_seconds, self._on_change)

    async def delete(self, name: str) -> None:
        await self._deletes.submit(name)
        if self._vms is not None:
            self._vms.pop(name, None)
            self._status.pop(name, None)
            self._pending.pop(name, None)

    async def observe(self, *, full: bool = False) -> Mapping[str, VMStatus]:
        now = self._clock()
        if full or self._vms is None or time.monotonic() - self._loaded_at >= RELOAD_EVERY:
            vms = await self._cloud.list()
            self._loaded_at = time.monotonic()
            self._vms, self._status, self._pending = {}, {}, {}
            for vm in vms:
                self._remember(vm, now)
        for name in [n for n, at in self._pending.items() if at <= now]:
            del self._pending[name]
            self._remember(self._vms[name], now)
        # A live read-only view, like a watch cache: no copy of every VM per pass.
        return MappingProxyType(self._status)

    def _remember(self, vm: FakeVM, now: datetime) -> None:
        assert self._vms is not None
        if vm.ready_at > now:
            phase = VMPhase.PENDING
            self._pending[vm.name] = vm.ready_at
        elif vm.fails:
            phase = VMPhase.FAILED
        else:
            phase = VMPhase.READY
        reason = "simulated boot failure" if phase is VMPhase.FAILED else ""
        self._vms[vm.name] = vm
        self._status[vm.name] = VMStatus(vm.name, vm.pool, phase, vm.zone, reason)


def fake_details(vm: FakeVM, now: datetime) -> VMDetails:
    """Made-up but stable connection details: an address in 10.0.0.0/8 and one of
    three nodes, both from the VM's name; the phase as KubeVirt would word it."""
    digest = hashlib.sha256(vm.name.encode()).digest()
    address = f"10.{digest[0]}.{digest[1]}.{digest[2] % 254 + 1}"
    phase = "Pending" if vm.ready_at > now else "Failed" if vm.fails else "Running"
    return VMDetails(addresses=(address,), node=f"fake-node-{digest[3] % 3 + 1}", phase=phase)


class FakeDescriber:
    """DescribeInstance for simulated VMs: one read of fake_vms."""

    def __init__(self, cloud: FakeCloud, clock: Clock = utcnow) -> None:
        self._cloud = cloud
        self._clock = clock

    async def describe(self, name: str) -> VMDetails | None:
        vm = await self._cloud.get(name)
        return None if vm is None else fake_details(vm, self._clock())

    async def close(self) -> None:
        return None
