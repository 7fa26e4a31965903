"""Simulated VMs: boot after ``boot_seconds``, fail at ``failure_rate``.

The VMs live in the database (table fake_vms), so like real ones they survive
a server crash and are shared by every server process.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Mapping
from datetime import timedelta

from vmpool.clock import Clock, utcnow
from vmpool.config import FakeProviderConfig, PoolConfig
from vmpool.providers.base import VMPhase, VMStatus
from vmpool.store.fakecloud import FakeCloud

ZONES = ("fake-zone-a", "fake-zone-b", "fake-zone-c")


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
        await self._cloud.create(name, pool.name, now, ready_at, self._fails(name), zone)
        # Like a watch event: tell the reconciler when the boot is done.
        asyncio.get_running_loop().call_later(self._config.boot_seconds, self._on_change)

    async def delete(self, name: str) -> None:
        await self._cloud.delete(name)

    async def observe(self) -> Mapping[str, VMStatus]:
        now = self._clock()
        out: dict[str, VMStatus] = {}
        for vm in await self._cloud.list():
            if vm["ready_at"] > now:
                phase = VMPhase.PENDING
            elif vm["fails"]:
                phase = VMPhase.FAILED
            else:
                phase = VMPhase.READY
            reason = "simulated boot failure" if phase is VMPhase.FAILED else ""
            out[vm["name"]] = VMStatus(vm["name"], vm["pool"], phase, vm["zone"], reason)
        return out
