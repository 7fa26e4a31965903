"""The small contract between the reconciler and a VM backend."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from vmpool.config.schema import PoolConfig


class VMPhase(enum.StrEnum):
    PENDING = "pending"  # created, not ready yet
    READY = "ready"  # booted and usable
    FAILED = "failed"  # will not become ready without being replaced


@dataclass(frozen=True, slots=True)
class VMStatus:
    """What the backend says about one VM of this deployment."""

    name: str
    pool: str
    phase: VMPhase
    zone: str = ""
    reason: str = ""  # why FAILED, for logs
    deleting: bool = False  # a delete is under way


@dataclass(frozen=True, slots=True)
class VMDetails:
    """What the backend knows of a VM for someone connecting to it."""

    addresses: tuple[str, ...] = ()  # interface IPs
    node: str = ""  # where it runs
    phase: str = ""  # the backend's own word (KubeVirt: the VMI's status.phase)


class Provider(Protocol):
    """A VM backend. Every call is idempotent by VM name.

    Errors are `vmpool.providers.errors.ProviderError` subclasses; the
    reconciler retries on its next pass.
    """

    #: VMs carrying this deployment's labels but no instance row are deleted
    #: once they have been seen for this long.
    orphan_grace: timedelta

    async def start(self, on_change: Callable[[], None]) -> None:
        """Begin watching; ``on_change`` is called (sync, cheap) when a VM changes."""

    async def close(self) -> None:
        """Stop watches and release connections."""

    async def create(self, name: str, pool: PoolConfig) -> None:
        """Create VM ``name`` for ``pool``; an existing VM of ours by that name is success."""

    async def delete(self, name: str) -> None:
        """Ask for VM ``name`` to be deleted; an absent VM is success."""

    async def observe(self, *, full: bool = False) -> Mapping[str, VMStatus] | None:
        """Every VM of this deployment by name, or None while the view is not
        yet complete (e.g. a watch that has not finished its first list).

        With ``full``, the caller will treat a VM's absence as the VM being gone
        (drift checks): a provider that caches must answer from a fresh view."""


class Describer(Protocol):
    """Answers DescribeInstance for the serving side (its own connection to the
    backend, so the serving thread never waits on the reconciler's)."""

    async def describe(self, name: str) -> VMDetails | None:
        """Connection details of VM ``name``; None if the backend does not know it."""

    async def close(self) -> None:
        """Release connections."""
