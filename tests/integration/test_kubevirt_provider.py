"""The KubeVirt provider against the fake Kubernetes API, through the real client.

Every test reaches the fake server through a kubeconfig file (the provider's
own config loading), and every VM the provider creates is validated against
KubeVirt's OpenAPI schema, by the fake server on create and again here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client.exceptions import ApiException

from tests.fakekube import VMIS, VMS, FakeKube
from tests.fakekube.fixtures import NAMESPACE, ZONES, fakekube, kubeconfig
from tests.fakekube.schema import CIRROS_EXAMPLE, vm_errors
from vmpool.config.loading import parse_config
from vmpool.config.schema import (
    HardwareTemplateConfig,
    KubevirtProviderConfig,
    PoolConfig,
    TierConfig,
)
from vmpool.domain.pools import PoolSpec, api_pool_config
from vmpool.ops.metrics import Metrics
from vmpool.providers import errors
from vmpool.providers.base import VMPhase, VMStatus
from vmpool.providers.kubevirt import KubevirtProvider, build_kubevirt_provider
from vmpool.providers.kubevirt_client import translate
from vmpool.providers.kubevirt_manifest import (
    DEPLOYMENT_LABEL,
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    POOL_ANNOTATION,
    POOL_LABEL,
    PREVIEW_NAME,
    check_label_value,
    pool_label_value,
    render_pool_preview,
    render_vm,
)
from vmpool.providers.kubevirt_watch import Informer

__all__ = ["fakekube", "kubeconfig"]  # fixtures, re-exported for pytest

pytestmark = pytest.mark.timeout(30)

DEPLOYMENT = "test"


def cirros_template(image: str | None = None) -> dict[str, Any]:
    template: dict[str, Any] = yaml.safe_load(CIRROS_EXAMPLE.read_text())
    if image is not None:
        template["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]["image"] = image
    return template


POOL = PoolConfig(name="small", template=cirros_template())
ZONED = PoolConfig(name="zoned", zone="pool-zone", template=cirros_template())
BROKEN = PoolConfig(name="broken", template=cirros_template("registry:5000/broken-disk:latest"))


class Changes:
    """The provider's on_change callback: counts calls and wakes waiters."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


Make = Callable[..., Awaitable[tuple[KubevirtProvider, Changes]]]


@pytest.fixture
async def make_provider(kubeconfig: Path) -> AsyncIterator[Make]:
    made: list[KubevirtProvider] = []

    async def make(
        *,
        deployment: str = DEPLOYMENT,
        qps: float = 500.0,
        burst: int = 500,
        kubeconfig_path: Path | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> tuple[KubevirtProvider, Changes]:
        config = KubevirtProviderConfig(
            namespace=NAMESPACE,
            kubeconfig=str(kubeconfig_path or kubeconfig),
            deployment=deployment,
            qps=qps,
            burst=burst,
        )
        kwargs.setdefault("failure_grace", 1.0)
        kwargs.setdefault("backoff_base", 0.05)
        kwargs.setdefault("backoff_cap", 0.5)
        kwargs.setdefault("metrics", Metrics())
        provider = KubevirtProvider(config, [POOL, ZONED, BROKEN], **kwargs)
        changes = Changes()
        made.append(provider)
        if start:
            await provider.start(changes)
        return provider, changes

    yield make
    for provider in made:
        await provider.close()


async def eventually(
    provider: KubevirtProvider,
    predicate: Callable[[dict[str, VMStatus]], bool],
    *,
    timeout: float = 10.0,
    what: str = "condition",
) -> dict[str, VMStatus]:
    """Poll observe() until ``predicate`` holds on the snapshot."""
    deadline = time.monotonic() + timeout
    last: dict[str, VMStatus] | None = None
    while time.monotonic() < deadline:
        snapshot = await provider.observe()
        if snapshot is not None:
            last = dict(snapshot)
            if predicate(last):
                return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; last observed: {last}")


async def settled(fakekube: FakeKube, provider: KubevirtProvider) -> None:
    """Wait for the first lists and for both watches (VMs, VMIs) to be open."""
    await eventually(provider, lambda s: True, what="first list")
    deadline = time.monotonic() + 5
    while fakekube.open_watches < 2:
        assert time.monotonic() < deadline, "watches did not open"
        await asyncio.sleep(0.01)


def printable(fakekube: FakeKube, name: str) -> str:
    vm = fakekube.get_object(VMS, NAMESPACE, name) or {}
    return str(vm.get("status", {}).get("printableStatus", ""))


async def relisted(informer: Informer | None, before: int) -> None:
    assert informer is not None
    deadline = time.monotonic() + 5
    while True:
        if informer.lists > before:
            return
        assert time.monotonic() < deadline, f"no relist (still {informer.lists} lists)"
        await asyncio.sleep(0.05)


def ready(*names: str) -> Callable[[dict[str, VMStatus]], bool]:
    return lambda s: all(n in s and s[n].phase is VMPhase.READY for n in names)


def errors_counted(provider_metrics: Metrics, operation: str, kind: str) -> float:
    value = provider_metrics.registry.get_sample_value(
        "vmpool_provider_errors_total", {"operation": operation, "kind": kind}
    )
    return value or 0.0


def assert_valid_vm(vm: dict[str, Any]) -> None:
    assert vm_errors(vm) == [], vm_errors(vm)


async def create_until_done(provider: KubevirtProvider, name: str, pool: PoolConfig) -> int:
    """What the reconciler does: call create again on its next pass until it succeeds."""
    failures = 0
    while True:
        try:
            await provider.create(name, pool)
            return failures
        except errors.ProviderError:
            failures += 1
            await asyncio.sleep(0.05)


# -- create, ready, zone -------------------------------------------------------------


async def test_create_becomes_ready_with_zone_from_node(
    fakekube: FakeKube, make_provider: Make
) -> None:
    provider, changes = await make_provider(start=False)
    assert await provider.observe() is None  # not started: no view yet
    await provider.start(changes)
    assert await eventually(provider, lambda s: s == {}, what="first list") == {}

    await provider.create("vmp-0001-aaaa", POOL)
    await provider.create("vmp-0002-bbbb", ZONED)
    snapshot = await eventually(
        provider,
        lambda s: ready("vmp-0001-aaaa", "vmp-0002-bbbb")(s) and bool(s["vmp-0001-aaaa"].zone),
        what="both VMs ready with zones",
    )
    first = snapshot["vmp-0001-aaaa"]
    assert first.pool == "small"
    assert first.zone in ZONES.values()
    assert not first.deleting
    vmi = fakekube.get_object(VMIS, NAMESPACE, "vmp-0001-aaaa")
    assert vmi is not None
    assert first.zone == ZONES[vmi["status"]["nodeName"]]
    assert snapshot["vmp-0002-bbbb"].zone == "pool-zone"  # the pool's zone wins
    assert changes.count > 0

    assert len(fakekube.created) == 2
    for body in fakekube.created:
        assert_valid_vm(body)
        assert body["metadata"]["namespace"] == NAMESPACE
        assert body["spec"]["runStrategy"] == "Always"
        assert "running" not in body["spec"]
        for labels in (body["metadata"]["labels"], body["spec"]["template"]["metadata"]["labels"]):
            assert labels[MANAGED_BY_LABEL] == "vmpool"
            assert labels[DEPLOYMENT_LABEL] == DEPLOYMENT
            assert labels[INSTANCE_LABEL] == body["metadata"]["name"]
            assert labels["kubevirt.io/vm"] == "vm-cirros"  # the template's label is kept
    # The VMI (and so its pod) carries our labels too.
    assert vmi["metadata"]["labels"][POOL_LABEL] == "small"
    # Each node was looked up once, not per observe().
    node_gets = [r for r in fakekube.requests if r.path.startswith("/api/v1/nodes/")]
    assert len(node_gets) <= len(ZONES)


async def test_nodes_forbidden_means_no_zone(fakekube: FakeKube, make_provider: Make) -> None:
    fakekube.faults.nodes_forbidden = True
    provider, _ = await make_provider()
    await provider.create("vmp-0003-cccc", POOL)
    await provider.create("vmp-0004-dddd", POOL)
    await eventually(provider, ready("vmp-0003-cccc", "vmp-0004-dddd"))
    await asyncio.sleep(0.2)
    snapshot = dict(await provider.observe() or {})
    assert {s.zone for s in snapshot.values()} == {""}
    node_gets = [r for r in fakekube.requests if r.path.startswith("/api/v1/nodes/")]
    assert 1 <= len(node_gets) <= len(ZONES)
    assert {r.status for r in node_gets} == {403}
    # Once told "forbidden", it stops asking.
    await provider.create("vmp-0019-ssss", POOL)
    await eventually(provider, ready("vmp-0019-ssss"))
    await asyncio.sleep(0.2)
    assert (await provider.observe() or {})["vmp-0019-ssss"].zone == ""
    assert len([r for r in fakekube.requests if r.path.startswith("/api/v1/nodes/")]) == len(
        node_gets
    )


async def test_deployments_sharing_a_namespace_do_not_see_each_other(
    fakekube: FakeKube, make_provider: Make
) -> None:
    ours, _ = await make_provider()
    theirs, _ = await make_provider(deployment="other")
    await theirs.create("vmp-0005-eeee", POOL)
    await eventually(theirs, ready("vmp-0005-eeee"))
    assert await ours.observe() == {}
    # Same name, someone else's VM: not success.
    with pytest.raises(errors.Conflict, match="does not carry deployment 'test'"):
        await ours.create("vmp-0005-eeee", POOL)


# -- delete --------------------------------------------------------------------------------


async def test_delete_takes_a_moment(fakekube: FakeKube, make_provider: Make) -> None:
    provider, _ = await make_provider()
    await provider.create("vmp-0006-ffff", POOL)
    await eventually(provider, ready("vmp-0006-ffff"))

    await provider.delete("vmp-0006-ffff")
    # Still there, marked as deleting, until the watch reports it gone.
    snapshot = await eventually(
        provider,
        lambda s: "vmp-0006-ffff" in s and s["vmp-0006-ffff"].deleting,
        what="deleting=True",
    )
    assert snapshot["vmp-0006-ffff"].phase is not VMPhase.READY
    assert fakekube.get_object(VMS, NAMESPACE, "vmp-0006-ffff") is not None
    await provider.delete("vmp-0006-ffff")  # repeated while deleting: fine
    await eventually(provider, lambda s: "vmp-0006-ffff" not in s, what="VM gone")
    assert fakekube.get_object(VMS, NAMESPACE, "vmp-0006-ffff") is None
    assert fakekube.get_object(VMIS, NAMESPACE, "vmp-0006-ffff") is None
    await provider.delete("vmp-0006-ffff")  # 404 counts as gone
    await provider.delete("vmp-never-made")


async def test_vm_deleted_behind_our_back_disappears(
    fakekube: FakeKube, make_provider: Make
) -> None:
    provider, _ = await make_provider()
    await provider.create("vmp-0007-gggg", POOL)
    await eventually(provider, ready("vmp-0007-gggg"))
    fakekube.delete_now(NAMESPACE, "vmp-0007-gggg")
    await eventually(provider, lambda s: "vmp-0007-gggg" not in s, what="VM gone")


# -- idempotent create -----------------------------------------------------------------------


async def test_conflict_on_retry_is_success(fakekube: FakeKube, make_provider: Make) -> None:
    provider, _ = await make_provider()
    await provider.create("vmp-0008-hhhh", POOL)
    await provider.create("vmp-0008-hhhh", POOL)  # a retry after a lost answer
    await eventually(provider, ready("vmp-0008-hhhh"))
    assert [vm["metadata"]["name"] for vm in fakekube.objects(VMS)] == ["vmp-0008-hhhh"]
    assert [r.status for r in fakekube.requests if r.method == "POST"] == [201, 409]


# -- watches ---------------------------------------------------------------------------------


async def test_broken_watch_relists_and_converges(fakekube: FakeKube, make_provider: Make) -> None:
    provider, _ = await make_provider()
    await provider.create("vmp-0009-iiii", POOL)
    await eventually(provider, ready("vmp-0009-iiii"))
    assert provider.vms is not None
    lists_before = provider.vms.lists

    fakekube.drop_watches(refuse_for=0.5)
    fakekube.delete_now(NAMESPACE, "vmp-0009-iiii")
    await provider.create("vmp-0010-jjjj", POOL)
    await eventually(
        provider,
        lambda s: ready("vmp-0010-jjjj")(s) and "vmp-0009-iiii" not in s,
        what="the view to converge after the watch broke",
    )
    assert provider.vms.lists > lists_before  # relisted after the lost connection


async def test_a_crashed_watch_is_restarted_and_passes_fail_only_meanwhile(
    fakekube: FakeKube, make_provider: Make
) -> None:
    provider, _ = await make_provider()
    await settled(fakekube, provider)
    assert provider.vms is not None
    informer = provider.vms
    real = informer._watch
    crashes = 0

    async def buggy(until: float) -> None:  # an error the watch does not expect
        nonlocal crashes
        crashes += 1
        raise RuntimeError("a bug in the watch loop")

    informer._watch = buggy  # type: ignore[method-assign]
    fakekube.drop_watches()  # the running watch ends; the next one crashes
    down = False
    deadline = time.monotonic() + 10
    while not down:
        assert time.monotonic() < deadline, "the crash was not reported"
        try:
            await provider.observe()
        except errors.ProviderError as err:
            down = "restarting" in str(err)
        await asyncio.sleep(0.01)
    informer._watch = real  # type: ignore[method-assign]
    # Restarted (with backoff), it relists and the view is usable again.
    await provider.create("vmp-0042-rest", POOL)
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline, "the watch did not come back"
        try:
            view = await provider.observe()
        except errors.ProviderError:
            view = None  # still restarting
        if view is not None and ready("vmp-0042-rest")(dict(view)):
            break
        await asyncio.sleep(0.02)
    assert crashes >= 1


async def test_expired_resource_version_relists(fakekube: FakeKube, make_provider: Make) -> None:
    # Short watches: the provider resumes from its last resourceVersion each second.
    provider, _ = await make_provider(watch_timeout=1.0)
    await eventually(provider, lambda s: s == {})
    assert provider.vms is not None
    lists = provider.vms.lists

    # 1. The history is compacted between two watches: the resume gets 410, then a relist.
    fakekube.expire_resource_versions(end_watches=True)
    await provider.create("vmp-0011-kkkk", POOL)
    await eventually(provider, ready("vmp-0011-kkkk"))
    await relisted(provider.vms, lists)
    resumed = [r for r in fakekube.requests if r.is_watch and r.query.get("resourceVersion")]
    assert resumed, "watches resume from a resourceVersion"
    assert all(r.query.get("allowWatchBookmarks", "").lower() == "true" for r in resumed)

    # 2. An open watch is told its resourceVersion expired (ERROR 410 event).
    lists = provider.vms.lists
    fakekube.expire_resource_versions(notify_watches=True)
    fakekube.delete_now(NAMESPACE, "vmp-0011-kkkk")
    await eventually(provider, lambda s: "vmp-0011-kkkk" not in s)
    await relisted(provider.vms, lists)


# -- faults ----------------------------------------------------------------------------------


async def test_write_storm_then_recovery_no_duplicates(
    fakekube: FakeKube, make_provider: Make
) -> None:
    metrics = Metrics()
    provider, _ = await make_provider(metrics=metrics, attempts=2)
    await eventually(provider, lambda s: s == {})
    names = [f"vmp-storm-{i:04d}" for i in range(8)]
    fakekube.fail_writes(0.5, 2.0, after_apply=0.5)
    await asyncio.gather(*(create_until_done(provider, n, POOL) for n in names))
    snapshot = await eventually(provider, ready(*names), what="all storm VMs ready")
    assert sorted(snapshot) == names
    assert sorted(vm["metadata"]["name"] for vm in fakekube.objects(VMS)) == names
    assert len(fakekube.created) == len(names)  # each VM accepted exactly once
    posts = [r for r in fakekube.requests if r.method == "POST"]
    assert any(r.status == 500 for r in posts), "the storm hit"
    # Some creates were carried out but answered 500: the retry's 409 was success.
    assert any(r.status == 409 for r in posts), "a lost answer was retried"
    assert errors_counted(metrics, "create", "server_error") > 0
    for body in fakekube.created:
        assert_valid_vm(body)

    fakekube.fail_writes(0.5, 1.0, after_apply=0.5)
    for name in names[:4]:
        while True:
            try:
                await provider.delete(name)
                break
            except errors.ProviderError:
                await asyncio.sleep(0.05)
    await eventually(provider, lambda s: sorted(s) == names[4:], what="deleted VMs gone")


async def test_backoff_honours_retry_after(fakekube: FakeKube, make_provider: Make) -> None:
    metrics = Metrics()
    provider, _ = await make_provider(metrics=metrics, max_wait=3.0)
    await settled(fakekube, provider)
    fakekube.reset_requests()
    fakekube.throttle(requests=1, retry_after=1)
    await provider.create("vmp-0012-llll", POOL)
    posts = [r for r in fakekube.requests if r.method == "POST"]
    assert [r.status for r in posts] == [429, 201]
    assert posts[1].at - posts[0].at >= 0.95  # waited out Retry-After: 1
    assert errors_counted(metrics, "create", "too_many_requests") == 1
    await eventually(provider, ready("vmp-0012-llll"))


async def test_long_retry_after_fails_fast_without_hammering(
    fakekube: FakeKube, make_provider: Make
) -> None:
    provider, _ = await make_provider(max_wait=1.0)
    await settled(fakekube, provider)
    fakekube.reset_requests()
    fakekube.throttle(seconds=5, retry_after=30)
    started = time.monotonic()
    with pytest.raises(errors.TooManyRequests) as caught:
        await provider.create("vmp-0013-mmmm", POOL)
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1.0
    # The next calls do not even reach the server while it asked us to wait.
    for _ in range(5):
        with pytest.raises(errors.TooManyRequests):
            await provider.create("vmp-0013-mmmm", POOL)
    # Well under the 5 s the fake refuses for (waiting that out would take longer).
    assert time.monotonic() - started < 4.0
    assert len([r for r in fakekube.requests if r.method == "POST"]) == 1


async def test_rate_limit_holds_under_a_storm(fakekube: FakeKube, make_provider: Make) -> None:
    qps, burst = 20.0, 5
    provider, _ = await make_provider(qps=qps, burst=burst)
    await settled(fakekube, provider)
    await asyncio.sleep(burst / qps)  # the bucket refills after start-up
    fakekube.reset_requests()
    names = [f"vmp-rate-{i:04d}" for i in range(40)]
    started = time.monotonic()
    await asyncio.gather(*(provider.create(n, POOL) for n in names))
    elapsed = time.monotonic() - started
    assert len(fakekube.requests) >= len(names)
    # The storm takes at least as long as the rate allows. (That no window of
    # a second holds more than burst + qps calls is checked by
    # tests/unit/providers/test_ratelimit.py on a fake clock: on a loaded machine, late wake-ups
    # bunch requests here without the limiter being wrong.)
    assert elapsed >= (len(names) - burst) / qps - 0.1


async def test_api_down_no_hot_loop(tmp_path: Path, make_provider: Make) -> None:
    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "x", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
                "current-context": "x",
            }
        )
    )
    metrics = Metrics()
    provider, _ = await make_provider(
        kubeconfig_path=dead, metrics=metrics, backoff_base=0.1, backoff_cap=1.0, max_wait=0.5
    )
    await asyncio.sleep(2.0)
    assert await provider.observe() is None
    attempts = errors_counted(metrics, "list", "unavailable")
    assert 1 <= attempts <= 16, attempts  # two informers backing off, not spinning
    started = time.monotonic()
    with pytest.raises(errors.Unavailable):
        await provider.create("vmp-0014-nnnn", POOL)
    assert time.monotonic() - started < 3.0


async def test_observe_is_none_until_the_first_list(
    fakekube: FakeKube, make_provider: Make
) -> None:
    # Refused until the test lifts it (was: for 0.6 s, which a loaded machine could
    # spend starting the provider, so its first list succeeded).
    fakekube.throttle(seconds=3600, retry_after=1)
    provider, _ = await make_provider()
    deadline = time.monotonic() + 10
    while not any(r.status == 429 and r.method == "GET" for r in fakekube.requests):
        assert time.monotonic() < deadline, "no list was refused"
        await asyncio.sleep(0.01)
    assert await provider.observe() is None
    fakekube.throttle()
    assert await eventually(provider, lambda s: s == {}) == {}


# -- failure -----------------------------------------------------------------------------------


async def test_template_that_never_boots_fails_after_grace(
    fakekube: FakeKube, make_provider: Make
) -> None:
    # The provider's monotonic clock moves only when the test moves it: the
    # grace is checked on both sides every run, however slow the machine.
    grace = 60.0
    now = [time.monotonic()]
    provider, _ = await make_provider(failure_grace=grace, clock=lambda: now[0])
    await provider.create("vmp-0015-oooo", BROKEN)
    # Wait for the provider's own watch to have seen the error (not just the
    # API server): its failure clock starts from what the watch delivers.
    informer = provider.vms
    assert informer is not None

    def pull_error_seen(s: dict[str, VMStatus]) -> bool:
        # Read the informer's dict each time: a relist replaces it.
        status = informer.objects.get("vmp-0015-oooo", {}).get("status") or {}
        return "vmp-0015-oooo" in s and "Pull" in str(status.get("printableStatus") or "")

    await eventually(provider, pull_error_seen, what="an image pull error in the watch")
    snapshot = dict(await provider.observe() or {})
    assert snapshot["vmp-0015-oooo"].phase is VMPhase.PENDING  # a pull may still work
    now[0] += grace - 0.1
    snapshot = dict(await provider.observe() or {})
    assert snapshot["vmp-0015-oooo"].phase is VMPhase.PENDING
    now[0] += 0.2
    snapshot = dict(await provider.observe() or {})
    assert snapshot["vmp-0015-oooo"].phase is VMPhase.FAILED
    assert "Pull" in snapshot["vmp-0015-oooo"].reason


async def test_steady_failure_state_reported_via_on_change(
    fakekube: FakeKube, make_provider: Make
) -> None:
    grace = 0.5
    provider, changes = await make_provider(failure_grace=grace)
    fakekube.fail_vms["vmp-0016-pppp"] = "ErrorUnschedulable"
    await provider.create("vmp-0016-pppp", POOL)
    await eventually(
        provider,
        lambda s: (
            "vmp-0016-pppp" in s and printable(fakekube, "vmp-0016-pppp") == "ErrorUnschedulable"
        ),
        what="ErrorUnschedulable",
    )
    await asyncio.sleep(0.1)
    assert (await provider.observe() or {})["vmp-0016-pppp"].phase is VMPhase.PENDING
    changes.event.clear()
    # Nothing changes in the cluster: the provider's own timer announces the failure.
    await asyncio.wait_for(changes.event.wait(), grace + 1.0)
    status = (await provider.observe() or {})["vmp-0016-pppp"]
    assert status.phase is VMPhase.FAILED
    assert status.reason.startswith("ErrorUnschedulable")


async def test_stopped_after_ready_fails_at_once(fakekube: FakeKube, make_provider: Make) -> None:
    provider, _ = await make_provider(failure_grace=30.0)
    await provider.create("vmp-0017-qqqq", POOL)
    await eventually(provider, ready("vmp-0017-qqqq"))
    fakekube.stop_vm(NAMESPACE, "vmp-0017-qqqq")
    snapshot = await eventually(
        provider, lambda s: s["vmp-0017-qqqq"].phase is VMPhase.FAILED, timeout=10.0
    )
    assert "stopped" in snapshot["vmp-0017-qqqq"].reason


async def test_invalid_template_is_rejected(fakekube: FakeKube, make_provider: Make) -> None:
    provider, _ = await make_provider()
    bad = PoolConfig(name="bad", template={"spec": {"template": {"spec": {"domain": 7}}}})
    with pytest.raises(errors.Invalid, match="is invalid"):
        await provider.create("vmp-0018-rrrr", bad)
    assert fakekube.objects(VMS) == []


# -- rendering and errors (no server) -------------------------------------------------------------


def test_render_vm_validates_for_the_cirros_example() -> None:
    template = cirros_template()
    template["spec"]["running"] = False  # old style: replaced by runStrategy
    template["metadata"]["annotations"] = {"team": "robots"}
    template["metadata"]["resourceVersion"] = "12"  # copied from kubectl: dropped
    pool = PoolConfig(name="small", template=template)
    vm = render_vm(pool, "vmp-3f30-x9t7q72u", namespace="ns", deployment="blue")
    assert_valid_vm(vm)
    assert vm["apiVersion"] == "kubevirt.io/v1"
    assert vm["kind"] == "VirtualMachine"
    assert vm["metadata"]["name"] == "vmp-3f30-x9t7q72u"
    assert vm["metadata"]["namespace"] == "ns"
    assert "resourceVersion" not in vm["metadata"]
    assert vm["metadata"]["annotations"] == {"team": "robots"}
    expected = {
        "kubevirt.io/vm": "vm-cirros",
        MANAGED_BY_LABEL: "vmpool",
        DEPLOYMENT_LABEL: "blue",
        POOL_LABEL: "small",
        INSTANCE_LABEL: "vmp-3f30-x9t7q72u",
    }
    assert vm["metadata"]["labels"] == expected
    assert vm["spec"]["template"]["metadata"]["labels"] == expected
    assert vm["spec"]["runStrategy"] == "Always"
    assert "running" not in vm["spec"]
    assert pool.template["spec"]["running"] is False  # the pool's template is not touched


def test_render_vm_defaults_and_rejects() -> None:
    bare = cirros_template()
    del bare["apiVersion"], bare["kind"], bare["metadata"]
    vm = render_vm(PoolConfig(name="p", template=bare), "vmp-1", namespace="n", deployment="d")
    assert_valid_vm(vm)
    assert (vm["apiVersion"], vm["kind"]) == ("kubevirt.io/v1", "VirtualMachine")
    wrong = PoolConfig(name="p", template={"kind": "Pod"})
    with pytest.raises(errors.Invalid, match=r"pools\[p\]\.template\.kind"):
        render_vm(wrong, "vmp-1", namespace="n", deployment="d")


def test_render_pool_preview_prints_yaml() -> None:
    config = parse_config(
        {
            "provider": {"kind": "kubevirt", "kubevirt": {"namespace": "vms", "deployment": "x"}},
            "pools": [{"name": "small", "template": cirros_template()}],
        }
    )
    text = render_pool_preview(config, "small")
    vm = yaml.safe_load(text)
    assert_valid_vm(vm)
    assert vm["metadata"]["name"] == PREVIEW_NAME
    assert vm["metadata"]["namespace"] == "vms"
    with pytest.raises(ValueError, match="no pool named 'nope'"):
        render_pool_preview(config, "nope")


def test_translate_api_errors() -> None:
    def exc(status: int, body: dict[str, Any] | str, headers: dict[str, str] | None = None) -> Any:
        e: Any = ApiException(status=status, reason="r")
        e.body = body if isinstance(body, str) else json.dumps(body)
        e.headers = headers
        return e

    long = "x" * 1000
    err = translate(exc(500, {"kind": "Status", "message": long}), "VM a")
    assert isinstance(err, errors.ServerError)
    assert len(str(err)) < 300
    assert isinstance(translate(exc(404, {"message": "gone"}), "VM a"), errors.NotFound)
    assert isinstance(translate(exc(409, {"message": "exists"}), "VM a"), errors.Conflict)
    assert isinstance(translate(exc(422, {"message": "bad"}), "VM a"), errors.Invalid)
    assert isinstance(translate(exc(400, {"message": "bad"}), "VM a"), errors.Invalid)
    throttled = translate(exc(429, {"message": "slow"}, {"Retry-After": "7"}), "VM a")
    assert isinstance(throttled, errors.TooManyRequests)
    assert throttled.retry_after == 7.0
    body_only = translate(exc(429, {"details": {"retryAfterSeconds": 3}}), "VM a")
    assert body_only.retry_after == 3.0
    assert isinstance(translate(ConnectionRefusedError(), "VM a"), errors.Unavailable)
    assert "VM a" in str(translate(exc(404, "not json"), "VM a"))


def test_factory_and_protocol_attributes() -> None:
    config = KubevirtProviderConfig(namespace="n", deployment="blue")
    provider = build_kubevirt_provider(config, [POOL], Metrics())
    assert provider.orphan_grace == config.orphan_grace
    with pytest.raises(ValueError, match="deployment"):
        build_kubevirt_provider(KubevirtProviderConfig(deployment="not a label!"), [], None)


# -- API pools (pool-api.md): VMs from a hardware template, versions substituted ------


async def test_api_pool_vm_from_its_hardware_template_with_versions_substituted(
    fakekube: FakeKube, make_provider: Make
) -> None:
    template = cirros_template()
    disk = template["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]
    disk["image"] = disk["image"].split(":")[0] + ":${intrinsic_os}"
    template.setdefault("metadata", {}).setdefault("labels", {})["runtime"] = "${runtime}"
    hw = HardwareTemplateConfig(name="default", template=template)
    tier = TierConfig(name="ad_hoc_single")
    name = "adhoc-lease-Jürgen.Müller-" + "x" * 60  # not a valid label value
    spec = PoolSpec("intrinsic.platform.20261201.RC00", "20261201.RC00", "default", "ad_hoc_single")
    pool = api_pool_config(name, spec, tier, hw)

    provider, _ = await make_provider()
    await provider.create("vmp-00ap-aaaa", pool)
    snapshot = await eventually(provider, ready("vmp-00ap-aaaa"), what="the API pool's VM ready")
    assert snapshot["vmp-00ap-aaaa"].pool == name  # the real name, from the annotation

    body = next(b for b in fakekube.created if b["metadata"]["name"] == "vmp-00ap-aaaa")
    assert_valid_vm(body)  # KubeVirt's schema, as the fake API server checked on create
    image = body["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]["image"]
    assert image.endswith(":20261201.RC00")
    assert body["metadata"]["labels"]["runtime"] == "intrinsic.platform.20261201.RC00"
    assert body["metadata"]["annotations"][POOL_ANNOTATION] == name
    label = body["metadata"]["labels"][POOL_LABEL]
    assert label == pool_label_value(name) and label != name
    check_label_value(label, "pool label")
    assert pool_label_value("Jürgen") != pool_label_value("Jurgen")  # hashed: no collisions
