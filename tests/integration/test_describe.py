"""Connection details for DescribeInstance: KubeVirt's VMI status through the real
client against the fake API server, and the fake provider's made-up ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.fakekube import VMIS, FakeKube
from tests.fakekube.fixtures import NAMESPACE, ZONES, fakekube, kubeconfig
from tests.fakekube.schema import vmi_errors
from tests.integration.test_kubevirt_provider import POOL, eventually
from vmpool.config.schema import KubevirtProviderConfig
from vmpool.providers.base import VMPhase
from vmpool.providers.fake import fake_details
from vmpool.providers.kubevirt import KubevirtProvider
from vmpool.providers.kubevirt_describe import KubevirtDescriber, vmi_details
from vmpool.store.fakecloud import FakeVM

__all__ = ["fakekube", "kubeconfig"]

pytestmark = pytest.mark.timeout(30)


async def test_kubevirt_describe_reads_the_vmi_status(fakekube: FakeKube, kubeconfig: Path) -> None:
    config = KubevirtProviderConfig(
        namespace=NAMESPACE, kubeconfig=str(kubeconfig), deployment="test", qps=500, burst=500
    )
    provider = KubevirtProvider(config, [POOL])
    describer = KubevirtDescriber(config)
    await provider.start(lambda: None)
    try:
        assert await describer.describe("vmp-none-none") is None
        await provider.create("vmp-desc-1", POOL)
        await eventually(
            provider,
            lambda s: "vmp-desc-1" in s and s["vmp-desc-1"].phase is VMPhase.READY,
            what="the VM ready",
        )
        details = await describer.describe("vmp-desc-1")
    finally:
        await describer.close()
        await provider.close()
    vmi = fakekube.get_object(VMIS, NAMESPACE, "vmp-desc-1")
    assert vmi is not None
    assert vmi_errors(vmi) == [], "the fake controller writes a schema-valid VMI status"
    assert details is not None
    assert details.phase == "Running"
    assert details.node in ZONES and details.node == vmi["status"]["nodeName"]
    assert details.addresses == tuple(vmi["status"]["interfaces"][0]["ipAddresses"])
    assert details.addresses[0].startswith("10.244.")


def test_vmi_details_takes_every_interfaces_addresses_once() -> None:
    vmi = {
        "status": {
            "phase": "Running",
            "nodeName": "n1",
            "interfaces": [
                {
                    "name": "default",
                    "ipAddress": "10.0.0.5",
                    "ipAddresses": ["10.0.0.5", "fd00::5"],
                },
                {"name": "lan", "ipAddress": "192.168.1.9"},
                {"name": "dup", "ipAddresses": ["10.0.0.5"]},
                {"name": "none"},
            ],
        }
    }
    details = vmi_details(vmi)
    assert details.addresses == ("10.0.0.5", "fd00::5", "192.168.1.9")
    assert (details.node, details.phase) == ("n1", "Running")
    assert vmi_details({}).addresses == () and vmi_details({}).phase == ""


def test_fake_details_are_stable_and_follow_the_boot() -> None:
    now = datetime.now(UTC)
    vm = FakeVM("vmp-x-1", "p", now, now + timedelta(seconds=2), False, "fake-zone-b")
    booting = fake_details(vm, now)
    up = fake_details(vm, now + timedelta(seconds=3))
    assert booting.phase == "Pending" and up.phase == "Running"
    assert booting.addresses == up.addresses and up.addresses[0].startswith("10.")
    assert up.node in {"fake-node-1", "fake-node-2", "fake-node-3"}
    other = fake_details(FakeVM("vmp-x-2", "p", now, now, False, "fake-zone-a"), now)
    assert other.addresses != up.addresses
    failed = fake_details(FakeVM("vmp-x-3", "p", now, now, True, "fake-zone-a"), now)
    assert failed.phase == "Failed"
