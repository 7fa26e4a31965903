"""pytest fixtures for the fake Kubernetes API. Import them into a test module:

from tests.fakekube.fixtures import fakekube, kubeconfig  # noqa: F401
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakekube.server import FakeKube

NAMESPACE = "vmpool-test"
ZONES = {"node-a": "zone-a", "node-b": "zone-b"}


@pytest.fixture
async def fakekube() -> AsyncIterator[FakeKube]:
    """A running fake API server with two zoned nodes and fast boots."""
    fake = FakeKube(boot_step=0.05, delete_delay=0.2, bookmark_interval=0.3)
    for node, zone in ZONES.items():
        fake.add_node(node, zone)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def kubeconfig(fakekube: FakeKube, tmp_path: Path) -> Path:
    """A kubeconfig file that points at ``fakekube`` with its bearer token."""
    return fakekube.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
