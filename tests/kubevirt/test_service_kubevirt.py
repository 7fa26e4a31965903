"""`vmpool serve` with ``provider.kind: kubevirt`` against the fake Kubernetes API.

The server is a real subprocess on a fresh PostgreSQL database; it reaches the
fake API server (``FakeKube``, run in this test's event loop on 127.0.0.1)
through a kubeconfig file. Clients use the generated grpclib stubs or the CLI.
Every assertion is about what a user or an operator would notice: VMs in the
cluster, rows in the database, leases, log lines.

The reconciler compares every row with every VM (orphans) each
min(RESYNC, orphan_grace / 2) seconds; a VM that vanishes is noticed from the
watch at once. The main service keeps the default orphan_grace (10 min, so a
full comparison only every 30 s) to show the prompt path; orphans are tested
on a service with orphan_grace 3 s.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import yaml
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.fakekube import NODES, VMIS, VMS, FakeKube
from tests.fakekube.schema import CIRROS_EXAMPLE, vm_errors
from tests.pg import TestPostgres
from tests.polling import eventually
from tests.server import ServerProcess
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api
from vmpool.proto.vmpool.admin import v1 as adm
from vmpool.providers.kubevirt_manifest import (
    DEPLOYMENT_LABEL,
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    POOL_LABEL,
    PREVIEW_NAME,
)
from vmpool.store.db import Database

# Above the sum of a test's own condition waits (and the module's server start,
# which its first test pays), so a slow step fails with its own message.
pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

ZONES = {"node-a": "zone-a", "node-b": "zone-b"}
ZONE_LABEL = "topology.kubernetes.io/zone"


def cirros_template(image: str | None = None) -> dict[str, Any]:
    template: dict[str, Any] = yaml.safe_load(CIRROS_EXAMPLE.read_text())
    if image is not None:
        template["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]["image"] = image
    return template


def pool(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "template": cirros_template(), **settings}


# --- the server process -----------------------------------------------------------------


class Serve(ServerProcess):
    """ServerProcess, started and stopped without blocking the event loop (the fake
    API server lives in it)."""

    async def astart(self) -> Serve:
        await asyncio.to_thread(self.start)
        return self

    async def astop(self) -> int | None:
        if self.proc is None:
            return None
        try:
            return await asyncio.to_thread(self.terminate, 20)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("vmpool serve did not stop within 20 s of SIGTERM") from None


@dataclass
class Svc:
    """A running `vmpool serve` (kubevirt provider) and what it works on."""

    fake: FakeKube
    namespace: str
    deployment: str
    db_url: str
    workdir: Path
    kubeconfig: Path
    pools: list[dict[str, Any]]
    orphan_grace: str = "10m"
    server: Serve | None = None
    db: Database | None = None
    channel: Channel | None = None
    stub: api.VmPoolLeaseServiceStub | None = None
    servers: list[Serve] = field(default_factory=list)

    # -- lifecycle --

    def config(self) -> dict[str, Any]:
        return {
            "reconcile_interval": "0.2s",
            "shutdown_grace": "2s",
            "log_level": "info",
            "provider": {
                "kind": "kubevirt",
                "kubevirt": {
                    "namespace": self.namespace,
                    "kubeconfig": str(self.kubeconfig),
                    "deployment": self.deployment,
                    "orphan_grace": self.orphan_grace,
                },
            },
            "pools": self.pools,
        }

    @property
    def config_path(self) -> Path:
        assert self.server is not None
        return self.server.config_path

    async def start(self) -> Svc:
        name = f"server{len(self.servers)}"
        self.server = Serve(
            self.config(), self.workdir, database_url=self.db_url, metrics_port=0, name=name
        )
        self.servers.append(self.server)
        await self.server.astart()
        if self.db is None:
            self.db = await asyncpg.create_pool(self.db_url, min_size=1, max_size=2)
        if self.channel is not None:
            self.channel.close()
        self.channel = Channel("127.0.0.1", self.server.port)
        self.stub = api.VmPoolLeaseServiceStub(self.channel)
        return self

    async def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.server is not None:
            await self.server.astop()
        if self.db is not None:
            await self.db.close()
            self.db = None

    def log(self) -> str:
        return "".join(s.log() for s in self.servers)

    def assert_clean_log(self) -> None:
        text = self.log()
        assert "Traceback" not in text, text[-4000:]
        assert "provider call crashed" not in text, text[-4000:]

    # -- the cluster --

    def vms(self, pool: str | None = None, *, deleting: bool = False) -> dict[str, dict[str, Any]]:
        """This deployment's VMs in the fake API by name (those being deleted only if asked)."""
        out = {}
        for vm in self.fake.objects(VMS, self.namespace):
            meta = vm["metadata"]
            labels = meta.get("labels") or {}
            if labels.get(DEPLOYMENT_LABEL) != self.deployment:
                continue
            if pool is not None and labels.get(POOL_LABEL) != pool:
                continue
            if meta.get("deletionTimestamp") and not deleting:
                continue
            out[meta["name"]] = vm
        return out

    def creates(self, pool: str | None = None) -> list[str]:
        """Names of the VMs of this deployment (and pool) the API accepted creates for."""
        names = []
        for body in self.fake.created:
            labels = body["metadata"].get("labels") or {}
            if labels.get(DEPLOYMENT_LABEL) != self.deployment:
                continue
            if body["metadata"].get("namespace") not in (None, self.namespace):
                continue
            if pool is None or labels.get(POOL_LABEL) == pool:
                names.append(body["metadata"]["name"])
        return names

    def node_zone_of(self, name: str) -> str:
        vmi = self.fake.get_object(VMIS, self.namespace, name)
        assert vmi is not None, f"no VMI for {name}"
        node = self.fake.get_object(NODES, "", vmi["status"]["nodeName"])
        assert node is not None
        return str(node["metadata"]["labels"].get(ZONE_LABEL, ""))

    # -- the database --

    async def rows(self, pool: str | None = None) -> dict[str, tuple[str, str]]:
        """Instance rows: name -> (state, zone)."""
        assert self.db is not None
        rows = await self.db.fetch(
            "SELECT name, state, zone FROM instances WHERE $1::text IS NULL OR pool = $1", pool
        )
        return {r["name"]: (r["state"], r["zone"]) for r in rows}

    async def counts(self, pool: str | None = None) -> dict[str, int]:
        return dict(Counter(state for state, _ in (await self.rows(pool)).values()))

    async def wait_filled(self, name: str, n: int, timeout: float = 30.0) -> dict[str, int]:
        """The pool holds exactly ``n`` ready rows, nothing else, and ``n`` live VMs."""

        async def probe() -> tuple[dict[str, int], int]:
            return await self.counts(name), len(self.vms(name, deleting=True))

        counts, _ = await eventually(
            probe,
            lambda got: got[0] == {"ready": n} and got[1] == n,
            timeout=timeout,
            what=f"pool {name}: {n} ready rows and {n} VMs",
        )
        return counts

    async def assert_zones(self, pool: str) -> None:
        """Every booted instance carries the zone of its VMI's node."""
        for name, (state, zone) in (await self.rows(pool)).items():
            if state != "provisioning":
                assert zone == self.node_zone_of(name), (name, state, zone)

    async def assert_consistent(self) -> None:
        """No duplicate VM per instance, and VMs == rows (no leak, no lost VM)."""
        per_instance = Counter(
            vm["metadata"]["labels"][INSTANCE_LABEL] for vm in self.vms(deleting=True).values()
        )
        dups = {k: v for k, v in per_instance.items() if v > 1}
        assert not dups, f"several VMs for one instance: {dups}"
        assert set(self.vms(deleting=True)) == set(await self.rows())

    # -- the API --

    async def lease(self, pool_name: str, tag: str = "kv-test") -> api.Lease:
        assert self.stub is not None
        reply = await self.stub.lease(api.LeaseRequest(pool=pool_name, service_tag=tag), timeout=10)
        return reply.lease

    async def return_(self, instance: str, tag: str = "kv-test") -> None:
        assert self.stub is not None
        await self.stub.return_(api.ReturnRequest(instance=instance, service_tag=tag), timeout=10)


def new_fake() -> FakeKube:
    fake = FakeKube(boot_step=0.1, delete_delay=0.5, bookmark_interval=0.3)
    for node, zone in ZONES.items():
        fake.add_node(node, zone)
    return fake


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeKube]:
    """One fake API server for the module; each service works in its own namespace."""
    fake = new_fake()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kubevirt-service")


Make = Callable[..., Awaitable[Svc]]


@pytest.fixture(scope="module")
async def make_svc(postgres: TestPostgres, module_dir: Path, fake: FakeKube) -> AsyncIterator[Make]:
    made: list[Svc] = []

    async def make(
        name: str,
        pools: list[dict[str, Any]],
        *,
        fake_api: FakeKube | None = None,
        orphan_grace: str = "10m",
        start: bool = True,
    ) -> Svc:
        api_server = fake_api or fake
        workdir = module_dir / name
        workdir.mkdir()
        kubeconfig = api_server.write_kubeconfig(workdir / "kubeconfig", namespace=name)
        svc = Svc(
            fake=api_server,
            namespace=name,
            deployment=f"dep-{name}",
            db_url=await postgres.fresh(),
            workdir=workdir,
            kubeconfig=kubeconfig,
            pools=pools,
            orphan_grace=orphan_grace,
        )
        made.append(svc)
        if start:
            await svc.start()
        return svc

    yield make
    for svc in made:
        await svc.close()


# --- one long-lived service: fill, lease, return, expiry ----------------------------------


BRIEF_LEASE = 5.0  # long enough for a GetLease right after the Lease on a loaded machine


@pytest.fixture(scope="module")
async def svc(make_svc: Make) -> Svc:
    """Two pools; RESYNC left at its default (the full comparison ran once, at start)."""
    return await make_svc(
        "main",
        [
            pool("small", min_ready=2, max_size=5),
            pool("brief", min_ready=1, max_size=3, default_lease=f"{BRIEF_LEASE:g}s"),
        ],
    )


async def test_pool_fills_with_valid_labelled_vms(svc: Svc) -> None:
    """Scenario 1: min_ready VMs per pool, schema-valid, labelled, runStrategy Always."""
    await svc.wait_filled("small", 2)
    await svc.wait_filled("brief", 1)
    vms = svc.vms()
    assert len(vms) == 3
    bodies = {}
    for body in svc.fake.created:
        bodies.setdefault(body["metadata"]["name"], body)
    for name, vm in vms.items():
        pool_name = vm["metadata"]["labels"][POOL_LABEL]
        ours = {
            MANAGED_BY_LABEL: "vmpool",
            DEPLOYMENT_LABEL: svc.deployment,
            POOL_LABEL: pool_name,
            INSTANCE_LABEL: name,
        }
        assert pool_name in ("small", "brief")
        # What the server sent, and what the cluster now holds, are valid VirtualMachines.
        assert vm_errors(bodies[name]) == []
        assert vm_errors(vm) == []
        for labels in (vm["metadata"]["labels"], vm["spec"]["template"]["metadata"]["labels"]):
            assert ours.items() <= labels.items(), labels
            assert labels["kubevirt.io/vm"] == "vm-cirros"  # the template's own label is kept
        assert vm["spec"]["runStrategy"] == "Always"
        assert "running" not in vm["spec"]
        assert vm["metadata"]["namespace"] == svc.namespace
        assert vm["status"]["ready"] is True
    # The VMIs (what KubeVirt starts from spec.template) carry the labels too.
    for name in vms:
        vmi = svc.fake.get_object(VMIS, svc.namespace, name)
        assert vmi is not None
        assert vmi["metadata"]["labels"][INSTANCE_LABEL] == name
    assert set(await svc.rows()) == set(vms)
    svc.assert_clean_log()


async def test_lease_zone_comes_from_the_node(svc: Svc) -> None:
    """Scenario 2: the lease's zone is the topology zone of its VMI's node."""
    await svc.wait_filled("small", 2)
    lease = await svc.lease("small")
    assert lease.pool == "small"
    assert lease.instance in svc.vms("small")
    assert lease.zone in ZONES.values()
    assert lease.zone == svc.node_zone_of(lease.instance)
    rows = await svc.rows("small")
    assert rows[lease.instance] == ("leased", lease.zone)
    await svc.assert_zones("small")
    # DescribeInstance: what to connect to, from the VMI's status.
    assert svc.channel is not None
    reply = await adm.VmPoolExtensionServiceStub(svc.channel).describe_instance(
        adm.DescribeInstanceRequest(instance=lease.instance), timeout=5
    )
    vmi = svc.fake.get_object(VMIS, svc.namespace, lease.instance)
    assert vmi is not None
    assert reply.instance.addresses == vmi["status"]["interfaces"][0]["ipAddresses"]
    assert reply.instance.node == vmi["status"]["nodeName"] and reply.instance.phase == "Running"
    assert (reply.instance.pool, reply.instance.zone) == ("small", lease.zone)
    await svc.return_(lease.instance)
    await svc.wait_filled("small", 2)  # the replacement's boot ends within the test


async def test_return_deletes_the_vm_then_the_row_and_replaces_it(svc: Svc) -> None:
    """Scenario 3: Return -> VM deleted in the API, row gone only after the VM, refill."""
    await svc.wait_filled("small", 2)
    lease = await svc.lease("small")
    name = lease.instance
    before = set(svc.vms("small"))
    await svc.return_(name)

    seen: list[tuple[str | None, bool, bool]] = []  # (row state, VM present, VM deleting)
    deadline = time.monotonic() + 10
    while True:
        rows = await svc.rows("small")
        state = rows[name][0] if name in rows else None
        vm = svc.fake.get_object(VMS, svc.namespace, name)  # read after the row: sound order
        deleting = bool(vm and vm["metadata"].get("deletionTimestamp"))
        seen.append((state, vm is not None, deleting))
        assert not (state is None and vm is not None), f"row of {name} gone while its VM exists"
        if state is None:
            break
        assert state == "destroying", seen[-5:]
        assert time.monotonic() < deadline, f"row of {name} still there: {seen[-5:]}"
        await asyncio.sleep(0.02)
    # The row was seen in `destroying` while the API still had the VM, being deleted.
    assert ("destroying", True, True) in seen, seen
    assert svc.fake.get_object(VMS, svc.namespace, name) is None
    assert svc.fake.get_object(VMIS, svc.namespace, name) is None
    await svc.wait_filled("small", 2)
    after = set(svc.vms("small"))
    assert name not in after
    assert len(after - before) == 1, "exactly one replacement"
    await svc.assert_consistent()


async def test_expired_lease_deletes_and_replaces_the_vm(svc: Svc) -> None:
    """Scenario 4: a lease past its expiry (default_lease 5s) ends; VM deleted; refill."""
    await svc.wait_filled("brief", 1)
    asked = time.time()
    lease = await svc.lease("brief")
    answered = time.time()
    # default_lease from when it was granted, however long the call took.
    expires = lease.expires.timestamp()
    assert asked + BRIEF_LEASE - 0.01 <= expires <= answered + BRIEF_LEASE + 0.01
    assert svc.stub is not None
    got = await svc.stub.get_lease(api.GetLeaseRequest(instance=lease.instance), timeout=5)
    assert got.lease.instance == lease.instance
    remaining = expires - time.time()

    async def probe() -> tuple[bool, dict[str, tuple[str, str]]]:
        return lease.instance in svc.vms(deleting=True), await svc.rows("brief")

    await eventually(
        probe,
        lambda got: not got[0] and lease.instance not in got[1],
        timeout=remaining + 20,
        what=f"expired {lease.instance} deleted",
    )
    with pytest.raises(GRPCError) as err:
        await svc.stub.get_lease(api.GetLeaseRequest(instance=lease.instance), timeout=5)
    assert err.value.status is Status.NOT_FOUND
    await svc.wait_filled("brief", 1)
    assert lease.instance not in svc.vms("brief")
    assert db_reason(await svc_history(svc, lease.instance)) == "expired"
    await svc.assert_consistent()
    svc.assert_clean_log()


async def svc_history(svc: Svc, instance: str) -> list[asyncpg.Record]:
    assert svc.db is not None
    return list(
        await svc.db.fetch("SELECT end_reason FROM lease_history WHERE instance = $1", instance)
    )


def db_reason(rows: list[asyncpg.Record]) -> str:
    assert len(rows) == 1, rows
    return str(rows[0]["end_reason"])


async def test_vanished_free_vm_is_replaced_promptly(svc: Svc) -> None:
    """Scenario 5: a free VM deleted directly in the API leaves the free set within
    seconds (from the watch's DELETED event, not the 30 s full comparison, since this
    service's orphan_grace is 10 min) and is replaced; it is never leased."""
    await svc.wait_filled("small", 2)
    victim = sorted(svc.vms("small"))[0]
    svc.fake.delete_now(svc.namespace, victim)
    start = time.monotonic()
    await eventually(
        lambda: svc.rows("small"),
        lambda rows: victim not in rows,
        timeout=10,  # well inside the 30 s full comparison
        what=f"the row of vanished {victim} dropped",
        interval=0.02,
    )
    noticed = time.monotonic() - start
    await svc.wait_filled("small", 2)
    assert victim not in svc.vms()
    assert f'"instance": "{victim}"' in svc.log()
    assert "vm vanished" in svc.log()
    print(f"vanished VM noticed after {noticed:.2f}s")
    await svc.assert_consistent()


async def test_vm_deleted_while_booting_is_replaced_at_once(make_svc: Make) -> None:
    """A VM deleted (VM and VMI) before it was ever ready: its row goes from the
    watch's DELETED event and a replacement under a new name is created at once, not
    the same name again after the 30 s full comparison. The template's image never
    pulls, so every VM stays booting for the test (failure grace 30 s)."""
    booting = pool("stuck", min_ready=2, max_size=3, template=cirros_template("broken/img:1"))
    svc = await make_svc("booting", [booting])

    async def probe() -> tuple[dict[str, tuple[str, str]], set[str]]:
        return await svc.rows("stuck"), set(svc.vms("stuck"))

    rows, _ = await eventually(
        probe,
        lambda got: len(got[0]) == 2 and set(got[0]) == got[1],
        timeout=10,
        what="two booting VMs",
    )
    assert {state for state, _ in rows.values()} == {"provisioning"}
    victim = sorted(rows)[0]
    svc.fake.delete_now(svc.namespace, victim)
    start = time.monotonic()
    rows, vms = await eventually(
        probe,
        lambda got: victim not in got[0] and len(got[0]) == 2 and set(got[0]) == got[1],
        timeout=10,  # well inside the 30 s full comparison
        what=f"booting {victim} deleted and replaced",
        interval=0.02,
    )
    print(f"VM deleted while booting replaced after {time.monotonic() - start:.2f}s")
    assert victim not in vms and svc.fake.get_object(VMIS, svc.namespace, victim) is None
    assert svc.creates("stuck").count(victim) == 1, "the same name was not created again"
    assert "vm vanished" in svc.log()
    await svc.assert_consistent()
    svc.assert_clean_log()
    # The never-booting VMs' simulations run until their VMs are gone.
    await svc.close()
    for name in svc.vms("stuck"):
        svc.fake.delete_now(svc.namespace, name)
    await eventually(
        lambda: asyncio.sleep(0, result=svc.vms("stuck", deleting=True)),
        lambda left: not left,
        timeout=15,
        what="the stuck VMs deleted",
    )
    await asyncio.sleep(svc.fake.boot_step * 4)  # their simulations notice and end


async def test_vanished_leased_vm_ends_the_lease(svc: Svc) -> None:
    """Spec 5: a leased instance whose VM disappears: the lease ends."""
    await svc.wait_filled("small", 2)
    lease = await svc.lease("small")
    svc.fake.delete_now(svc.namespace, lease.instance)
    await eventually(
        lambda: svc_history(svc, lease.instance),
        lambda rows: len(rows) == 1,
        timeout=10,  # well inside the 30 s full comparison
        what=f"lease of vanished {lease.instance} ended",
    )
    assert db_reason(await svc_history(svc, lease.instance)) == "vm vanished"
    assert svc.stub is not None
    with pytest.raises(GRPCError) as err:
        await svc.stub.get_lease(api.GetLeaseRequest(instance=lease.instance), timeout=5)
    assert err.value.status is Status.NOT_FOUND
    await svc.wait_filled("small", 2)
    await svc.assert_consistent()
    svc.assert_clean_log()


# --- orphans (orphan_grace 3 s) ---------------------------------------------------------


@pytest.fixture(scope="module")
async def drift(make_svc: Make) -> Svc:
    return await make_svc("drift", [pool("small", min_ready=1, max_size=4)], orphan_grace="3s")


def vm_body(svc: Svc, name: str, deployment: str) -> dict[str, Any]:
    """The VM `vmpool render` prints for pool small, renamed and relabelled."""
    body: dict[str, Any] = yaml.safe_load(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "vmpool",
                "render",
                "--config",
                str(svc.config_path),
                "--pool",
                "small",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    )
    body["metadata"]["name"] = name
    for labels in (body["metadata"]["labels"], body["spec"]["template"]["metadata"]["labels"]):
        labels[INSTANCE_LABEL] = name
        labels[DEPLOYMENT_LABEL] = deployment
    return body


async def test_orphan_is_deleted_after_grace(drift: Svc) -> None:
    """Scenario 6: a VM with this deployment's labels and no row is deleted after
    orphan_grace (3 s), not before; the pool's own VMs and another deployment's VM
    in the same namespace are left alone."""
    await drift.wait_filled("small", 1)
    ours = set(drift.vms("small"))
    orphan, foreign = "vmp-dead-orphan01", "vmp-dead-foreign1"
    await post_vm(drift, vm_body(drift, foreign, "someone-else"))
    await post_vm(drift, vm_body(drift, orphan, drift.deployment))
    created = time.monotonic()

    def state() -> dict[str, dict[str, Any]]:
        return {vm["metadata"]["name"]: vm for vm in drift.fake.objects(VMS, drift.namespace)}

    await eventually(
        lambda: asyncio.sleep(0, state()),
        lambda vms: orphan not in vms or bool(vms[orphan]["metadata"].get("deletionTimestamp")),
        timeout=3 + 1.5 + 10,
        what=f"orphan {orphan} deleted",
        interval=0.02,
    )
    took = time.monotonic() - created
    assert took >= 2.9, f"orphan deleted after {took:.1f}s, before orphan_grace"
    assert set(drift.vms("small")) == ours
    assert orphan not in await drift.rows()
    await eventually(
        lambda: asyncio.sleep(0, state()),
        lambda vms: orphan not in vms,
        timeout=15,
        what="orphan gone",
    )
    vms = state()
    assert foreign in vms and not vms[foreign]["metadata"].get("deletionTimestamp")
    assert '"reason": "orphan"' in drift.log()
    print(f"orphan deleted {took:.2f}s after creation")
    await drift.assert_consistent()
    drift.assert_clean_log()


async def post_vm(svc: Svc, body: dict[str, Any]) -> None:
    """Create a VM directly through the fake's REST API (as another client would)."""
    import aiohttp

    url = f"{svc.fake.url}/apis/kubevirt.io/v1/namespaces/{svc.namespace}/virtualmachines"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers={"Authorization": f"Bearer {svc.fake.token}"}) as resp,
    ):
        assert resp.status == 201, await resp.text()


# --- faults ---------------------------------------------------------------------------


async def test_write_errors_converge_without_duplicates_or_leaks(make_svc: Make) -> None:
    """Scenario 7: 50% of writes answer 500 for 5 s (half of those carried out first:
    lost answers) while leases are taken and returned, so VMs are both deleted and
    created during the burst; afterwards VMs == rows and no instance has two VMs."""
    fake = new_fake()
    await fake.start()
    try:
        svc = await make_svc(
            "burst", [pool("p", min_ready=4, max_size=8, max_provisioning=4)], fake_api=fake
        )
        await svc.wait_filled("p", 4)
        fake.fail_writes(0.5, 5.0)
        end = fake.faults.write_failure_until
        returned = 0
        while time.monotonic() < end:
            if (await svc.counts("p")).get("ready"):
                lease = await svc.lease("p")
                await svc.return_(lease.instance)
                returned += 1
            await asyncio.sleep(0.2)
        failed = [r for r in fake.requests if r.is_write and r.status == 500]
        posts = sum(1 for r in failed if r.method == "POST")
        deletes = sum(1 for r in failed if r.method == "DELETE")
        assert posts and deletes, f"the burst failed {posts} creates and {deletes} deletes"
        await svc.wait_filled("p", 4, timeout=20)
        await svc.assert_consistent()
        # And it stays that way (no late duplicate create, no late leak).
        await asyncio.sleep(1.5)
        await svc.assert_consistent()
        assert await svc.counts("p") == {"ready": 4}
        creates = Counter(svc.creates("p"))
        assert all(n == 1 for n in creates.values()), creates
        print(
            f"burst: {returned} returns; 500s on {posts} creates, {deletes} deletes; "
            f"{len(creates)} VMs created in all"
        )
        svc.assert_clean_log()
        await svc.close()
    finally:
        await fake.stop()


async def test_broken_template_backs_off(make_svc: Make) -> None:
    """Scenario 8: VMs that never boot (ErrImagePull) time out, are replaced with a
    per-pool backoff (few creates in ~10 s), and a healthy pool beside it still fills."""
    svc = await make_svc(
        "broken",
        [
            pool(
                "bad",
                min_ready=2,
                max_size=4,
                boot_timeout="2s",
                template=cirros_template("registry:5000/kubevirt/broken-disk:devel"),
            ),
            pool("good", min_ready=1, max_size=2),
        ],
    )
    await svc.wait_filled("good", 1)
    await asyncio.sleep(10)
    creates = svc.creates("bad")
    failures = [
        line for line in svc.log().splitlines() if '"boot failed"' in line and '"bad"' in line
    ]
    assert len(failures) >= 2, svc.log()[-3000:]
    assert all('"boot_timeout"' in line and "pool_backoff_s" in line for line in failures)
    # 2 at once, a timeout after 2 s, then >= ~10 s of pool backoff: one more round at most.
    assert 2 <= len(creates) <= 4, creates
    assert len(set(creates)) == len(creates)
    assert (await svc.counts("bad")).get("ready", 0) == 0
    for name in svc.vms("bad"):
        vm = svc.fake.get_object(VMS, svc.namespace, name)
        assert vm is not None
        assert vm["status"].get("printableStatus") in (
            None,
            "Provisioning",
            "ErrImagePull",
            "ImagePullBackOff",
        )
    await svc.wait_filled("good", 1)
    await svc.assert_consistent()
    print(f"broken: {len(creates)} creates, {len(failures)} boot failures in ~12 s")
    svc.assert_clean_log()
    await svc.close()


@pytest.mark.timeout(240)  # waits of 15 + 15 + 20 + 20 s and three server starts
async def test_sigkill_mid_provisioning_then_restart(make_svc: Make) -> None:
    """Scenario 9: SIGKILL while creates are under way (every create answered 500,
    half of them carried out: the server cannot know which VMs exist) and VMs boot;
    then SIGKILL right after two Returns. Each restarted server converges with one VM
    per row, none duplicated, none leaked."""
    fake = FakeKube(boot_step=0.3, delete_delay=0.5, bookmark_interval=0.3)
    for node, zone in ZONES.items():
        fake.add_node(node, zone)
    await fake.start()
    try:
        fake.fail_writes(1.0, 120.0, after_apply=0.5)
        svc = await make_svc(
            "crash", [pool("p", min_ready=6, max_size=8, max_provisioning=6)], fake_api=fake
        )
        await eventually(
            lambda: asyncio.sleep(0, len(svc.vms())),
            lambda n: n >= 1,
            timeout=15,
            what="a first VM",
            interval=0.002,
        )
        assert svc.server is not None
        svc.server.kill()
        fake.fail_writes(0.0, 0.0)
        at_kill = await svc.counts("p")
        vms_at_kill = set(svc.vms(deleting=True))
        assert at_kill == {"provisioning": 6}, at_kill

        def booted() -> bool:
            return all(
                fake.get_object(VMS, svc.namespace, n)["status"].get("ready") for n in vms_at_kill
            )

        await eventually(
            lambda: asyncio.sleep(0, booted()),
            bool,
            timeout=15,
            what="the VMs created before the crash booted",
        )
        await svc.start()
        await svc.wait_filled("p", 6, timeout=20)
        await svc.assert_consistent()
        assert vms_at_kill <= set(svc.vms("p")), "a VM from before the crash was lost"
        # VMs that finished booting while no server ran still get their node's zone.
        await svc.assert_zones("p")
        creates = Counter(svc.creates("p"))
        assert all(n == 1 for n in creates.values()), creates
        assert len(creates) == 6, creates

        # Crash again while two returned VMs are being deleted and replaced.
        leases = [await svc.lease("p") for _ in range(2)]
        for lease in leases:
            await svc.return_(lease.instance)
        await asyncio.sleep(0.05)
        svc.server.kill()
        at_second_kill = await svc.counts("p")
        await svc.start()
        await svc.wait_filled("p", 6, timeout=20)
        await asyncio.sleep(1.0)
        await svc.assert_consistent()
        assert await svc.counts("p") == {"ready": 6}
        for lease in leases:
            assert lease.instance not in svc.vms(deleting=True)
        creates = Counter(svc.creates("p"))
        assert all(n == 1 for n in creates.values()), creates
        assert len(creates) == 8, creates
        print(
            f"crash: at first kill {at_kill} with {len(vms_at_kill)} VMs; "
            f"at second kill {at_second_kill}"
        )
        svc.assert_clean_log()
        await svc.close()
    finally:
        await fake.stop()


# --- vmpool render ----------------------------------------------------------------------


def test_render_validates_against_the_schema(tmp_path: Path) -> None:
    """Scenario 10: `vmpool render` prints a VirtualMachine KubeVirt would accept."""
    config = {
        "provider": {
            "kind": "kubevirt",
            "kubevirt": {"namespace": "vms", "deployment": "prod"},
        },
        "pools": [pool("small", labels={"size": "s"})],
    }
    path = tmp_path / "vmpool.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [sys.executable, "-m", "vmpool", "render", "--config", str(path), "--pool", "small"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    vm = yaml.safe_load(out.stdout)
    assert vm_errors(vm) == []
    assert vm["metadata"]["name"] == PREVIEW_NAME
    assert vm["metadata"]["namespace"] == "vms"
    assert vm["spec"]["runStrategy"] == "Always"
    for labels in (vm["metadata"]["labels"], vm["spec"]["template"]["metadata"]["labels"]):
        assert labels[MANAGED_BY_LABEL] == "vmpool"
        assert labels[DEPLOYMENT_LABEL] == "prod"
        assert labels[POOL_LABEL] == "small"
    bad = subprocess.run(
        [sys.executable, "-m", "vmpool", "render", "--config", str(path), "--pool", "nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "nope" in bad.stderr
