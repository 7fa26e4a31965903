"""VMPoolService (pool-api.md) end to end: grpcio stubs compiled from
api/intrinsic_proto/vmpoolapi/v1/vmpool_api.proto at test time, called the way
`inctl vm pool` calls them, against a real `vmpool serve`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.e2e.clients import Client, RpcError
from tests.e2e.conftest import Running
from tests.e2e.grpcio_stack import compile_pool_api
from tests.polling import eventually

CONFIG_POOLS = [{"name": "cfg", "min_ready": 1, "max_size": 2}]
EXTRA = {
    "tiers": [
        {"name": "small", "description": "two warm VMs", "min_ready": 2, "max_size": 3},
        {"name": "cold", "description": "nothing warm", "min_ready": 0, "max_size": 2},
    ],
    "hardware_templates": [
        {"name": "gpu", "description": "with a GPU", "has_gpu": True, "template": {}},
    ],
    "versions": {
        "runtime": "intrinsic.platform.20261201.RC00",
        "intrinsic_os": "20261201.RC00",
        "runtime_pattern": r"^intrinsic\.platform\.\d{8}\.RC\d{2}$",
        "intrinsic_os_pattern": r"^\d{8}\.RC\d{2}$",
    },
}
RUNTIME = "intrinsic.platform.20261201.RC00"
OS = "20261201.RC00"


class PoolApi:
    """grpcio stubs for VMPoolService; errors as RpcError(code name, details)."""

    def __init__(self, mods: tuple[ModuleType, ModuleType], address: str) -> None:
        self.pb2, pb2_grpc = mods
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb2_grpc.VMPoolServiceStub(self._channel)

    async def call(self, method: str, **fields: Any) -> Any:
        request = getattr(self.pb2, f"{method}Request")(**fields)
        try:
            return await getattr(self._stub, method)(request, timeout=10)
        except grpc.aio.AioRpcError as err:
            raise RpcError(err.code().name, err.details() or "") from None

    async def code(self, method: str, **fields: Any) -> str:
        try:
            await self.call(method, **fields)
        except RpcError as err:
            return err.code
        return "OK"

    def spec(self, **fields: str) -> Any:
        return self.pb2.Spec(**fields)

    async def create(self, name: str, **spec: str) -> Any:
        spec.setdefault("pool_tier", "ad_hoc_single")
        spec.setdefault("hardware_template", "default")
        return await self.call("CreatePool", name=name, spec=self.spec(**spec))

    async def listed(self) -> dict[str, Any]:
        reply = await self.call("ListPools")
        return {p.name: p for p in reply.pools}

    async def pool(self, name: str) -> Any:
        return (await self.listed()).get(name)

    async def wait_status(self, name: str, status: str, timeout: float = 15.0) -> Any:
        return await eventually(
            lambda: self.pool(name),
            lambda p: p is not None and p.current_status == status and not p.reconciling,
            timeout,
            f"pool {name} {status} and not reconciling",
        )

    async def wait_gone(self, name: str, timeout: float = 15.0) -> None:
        await eventually(lambda: self.pool(name), lambda p: p is None, timeout, f"{name} gone")

    async def close(self) -> None:
        await self._channel.close()


@pytest.fixture(scope="module")
def pool_modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    return compile_pool_api(tmp_path_factory.mktemp("grpcio-pool-gen"))


@pytest.fixture(scope="module")
async def server(start_server: Callable[..., Awaitable[Running]]) -> AsyncIterator[Running]:
    running = await start_server(CONFIG_POOLS, name="poolapi", **EXTRA)
    yield running
    running.assert_clean_log()


@pytest.fixture
async def papi(
    pool_modules: tuple[ModuleType, ModuleType], server: Running
) -> AsyncIterator[PoolApi]:
    p = PoolApi(pool_modules, server.address)
    yield p
    await p.close()


@pytest.fixture
async def lease_client(server: Running, client_factory: Callable[[str, str], Client]) -> Client:
    return client_factory("grpcio", server.address)


def name() -> str:
    return f"p-{uuid.uuid4().hex[:8]}"


async def lease_retrying(client: Client, pool: str, rid: str, timeout: float = 15.0) -> Any:
    """The ad-hoc client's loop: one reservation id, NOT_FOUND/RESOURCE_EXHAUSTED retried."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await client.lease(pool, reservation_id=rid)
        except RpcError as err:
            if err.code not in ("NOT_FOUND", "RESOURCE_EXHAUSTED"):
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.1)


# --- catalogs ---------------------------------------------------------------------


async def test_tiers_and_templates_in_config_order_with_the_builtins(papi: PoolApi) -> None:
    tiers = (await papi.call("ListTiers")).tiers
    assert [(t.name, t.description) for t in tiers] == [
        ("small", "two warm VMs"),
        ("cold", "nothing warm"),
        ("ad_hoc_single", "One VM, made on demand"),
    ]
    templates = (await papi.call("ListHardwareTemplates")).hw_templates
    assert [(t.name, t.has_gpu) for t in templates] == [("gpu", True), ("default", False)]


# --- create --------------------------------------------------------------------------


async def test_create_resolves_and_pins_versions_and_lists_the_same_spec(papi: PoolApi) -> None:
    n = name()
    created = await papi.create(n, pool_tier="small")
    assert created.name == n
    assert created.desired_status == "RUNNING"
    assert created.current_status == "INITIALIZING"
    assert created.reconciling
    assert (created.spec.runtime, created.spec.intrinsic_os) == (RUNTIME, OS)
    assert (created.spec.pool_tier, created.spec.hardware_template) == ("small", "default")
    listed = await papi.pool(n)
    assert listed is not None and listed.spec == created.spec  # visible at once
    ready = await papi.wait_status(n, "RUNNING")
    assert ready.spec == created.spec


async def test_create_keeps_the_name_verbatim(papi: PoolApi, lease_client: Client) -> None:
    n = f"Ad-Hoc_Ünïcode.{uuid.uuid4().hex[:6]}"
    created = await papi.create(n, pool_tier="cold")
    assert created.name == n
    assert created.current_status == "RUNNING"  # min_ready 0: INITIALIZING is skipped
    assert n in [p for p, _ in await lease_client.pools()]
    await papi.call("DeletePool", name=n)
    await papi.wait_gone(n)


@pytest.mark.parametrize(
    ("pool_name", "spec", "code", "names"),
    [
        ("", {}, "INVALID_ARGUMENT", "name"),
        ("-leading-dash", {}, "INVALID_ARGUMENT", "name"),
        ("has space", {}, "INVALID_ARGUMENT", "name"),
        ("x" * 129, {}, "INVALID_ARGUMENT", "name"),
        ("ok-name", {"pool_tier": "huge"}, "INVALID_ARGUMENT", "'small', 'cold', 'ad_hoc_single'"),
        ("ok-name", {"hardware_template": "nope"}, "INVALID_ARGUMENT", "'gpu', 'default'"),
        ("ok-name", {"runtime": "latest"}, "INVALID_ARGUMENT", "spec.runtime"),
        ("ok-name", {"intrinsic_os": "v1"}, "INVALID_ARGUMENT", "spec.intrinsic_os"),
        ("cfg", {}, "ALREADY_EXISTS", "configuration file"),
    ],
)
async def test_create_validates_synchronously(
    papi: PoolApi, pool_name: str, spec: dict[str, str], code: str, names: str
) -> None:
    with pytest.raises(RpcError) as err:
        await papi.create(pool_name, **spec)
    assert err.value.code == code
    assert names in err.value.message
    assert await papi.pool("ok-name") is None


async def test_create_twice_is_already_exists(papi: PoolApi) -> None:
    n = name()
    await papi.create(n, pool_tier="cold")
    assert await papi.code("CreatePool", name=n, spec=papi.spec()) == "ALREADY_EXISTS"


# --- update ---------------------------------------------------------------------------


async def update(papi: PoolApi, n: str, mask: list[str] | None, **spec: str) -> Any:
    fields: dict[str, Any] = {"name": n, "spec": papi.spec(**spec)}
    if mask is not None:
        fields["update_mask"] = papi.pb2.google_dot_protobuf_dot_field__mask__pb2.FieldMask(
            paths=mask
        )
    return await papi.call("UpdatePool", **fields)


async def test_update_with_prefixed_and_bare_paths(papi: PoolApi) -> None:
    n = name()
    await papi.create(n, pool_tier="cold")
    new_rt = "intrinsic.platform.20270101.RC01"
    # inctl sends tier/template defaults outside the mask: they must be ignored.
    got = await update(
        papi, n, ["spec.runtime"], runtime=new_rt, pool_tier="ad_hoc_single", hardware_template="x"
    )
    assert (got.spec.runtime, got.spec.intrinsic_os, got.spec.pool_tier) == (new_rt, OS, "cold")
    got = await update(papi, n, ["intrinsic_os"], intrinsic_os="20270101.RC01")
    assert got.spec.intrinsic_os == "20270101.RC01"
    got = await update(papi, n, ["spec.runtime"], runtime="")  # empty: current version
    assert got.spec.runtime == RUNTIME
    assert await papi.pool(n) is not None and (await papi.pool(n)).spec == got.spec


async def test_update_present_but_empty_mask_changes_nothing(papi: PoolApi) -> None:
    n = name()
    created = await papi.create(n, pool_tier="cold", runtime="intrinsic.platform.20250101.RC00")
    got = await update(papi, n, [], runtime="", pool_tier="small", hardware_template="gpu")
    assert got.name == n  # a full Pool, never the empty "unchanged" one
    assert got.spec == created.spec
    assert got.current_status == "RUNNING"


async def test_update_absent_mask_replaces_every_field_with_defaults(papi: PoolApi) -> None:
    n = name()
    await papi.create(
        n, pool_tier="cold", hardware_template="gpu", runtime="intrinsic.platform.20250101.RC00"
    )
    got = await update(papi, n, None, intrinsic_os="20250505.RC03")
    assert (got.spec.runtime, got.spec.intrinsic_os) == (RUNTIME, "20250505.RC03")
    assert (got.spec.pool_tier, got.spec.hardware_template) == ("ad_hoc_single", "default")


async def test_update_unknown_path_is_invalid_argument(papi: PoolApi) -> None:
    n = name()
    await papi.create(n, pool_tier="cold")
    with pytest.raises(RpcError) as err:
        await update(papi, n, ["spec.colour"])
    assert err.value.code == "INVALID_ARGUMENT" and "update_mask" in err.value.message


async def test_a_repeated_update_is_a_status_poll_that_restarts_nothing(
    papi: PoolApi, server: Running
) -> None:
    n = name()
    await papi.create(n, pool_tier="small")
    await papi.wait_status(n, "RUNNING")
    first = await update(papi, n, ["spec.pool_tier"], pool_tier="small")
    before = await server.sql("SELECT updated_at FROM pools WHERE name = $1", n)
    names = {r["name"] for r in await server.sql("SELECT name FROM instances WHERE pool = $1", n)}
    for _ in range(3):
        again = await update(papi, n, ["spec.pool_tier"], pool_tier="small")
        assert again == first
        assert (again.current_status, again.reconciling) == ("RUNNING", False)
    after = await server.sql("SELECT updated_at FROM pools WHERE name = $1", n)
    assert before == after
    still = {r["name"] for r in await server.sql("SELECT name FROM instances WHERE pool = $1", n)}
    assert still == names


@pytest.mark.parametrize(
    ("method", "code"),
    [("UpdatePool", "FAILED_PRECONDITION"), ("DeletePool", "FAILED_PRECONDITION")],
)
async def test_config_pools_are_not_changed_through_the_api(
    papi: PoolApi, method: str, code: str
) -> None:
    with pytest.raises(RpcError) as err:
        await papi.call(method, name="cfg")
    assert err.value.code == code and "configuration file" in err.value.message


@pytest.mark.parametrize(
    "method", ["UpdatePool", "DeletePool", "StopPool", "PausePool", "ResumePool"]
)
async def test_unknown_pool_is_not_found_and_empty_name_invalid(papi: PoolApi, method: str) -> None:
    with pytest.raises(RpcError) as err:
        await papi.call(method, name="no-such-pool")
    assert err.value.code == "NOT_FOUND" and "no-such-pool" in err.value.message
    assert await papi.code(method, name="") == "INVALID_ARGUMENT"


# --- statuses --------------------------------------------------------------------------


async def test_pause_stop_resume_delete_of_an_api_pool(
    papi: PoolApi, lease_client: Client, server: Running
) -> None:
    n = name()
    await papi.create(n, pool_tier="small")
    await papi.wait_status(n, "RUNNING")
    lease = await lease_client.lease(n)

    await papi.call("PausePool", name=n)
    await papi.call("PausePool", name=n)  # idempotent
    paused = await papi.wait_status(n, "PAUSED")
    assert paused.desired_status == "PAUSED"
    with pytest.raises(RpcError) as err:
        await lease_client.lease(n)
    assert err.value.code == "FAILED_PRECONDITION" and "PAUSED" in err.value.message
    # The lease that already exists keeps working.
    assert (await lease_client.get_lease(lease.instance)).pool == n

    await papi.call("ResumePool", name=n)
    resumed = await papi.pool(n)
    assert resumed.desired_status == "RUNNING"
    assert resumed.current_status == "INITIALIZING"
    await papi.wait_status(n, "RUNNING")

    await papi.call("StopPool", name=n)
    stopping = await papi.pool(n)
    assert (stopping.current_status, stopping.reconciling) == ("STOPPING", True)
    await asyncio.sleep(0.5)
    assert (await papi.pool(n)).current_status == "STOPPING"  # the lease still runs
    await lease_client.return_(lease.instance)
    await papi.wait_status(n, "STOPPED")

    await papi.call("DeletePool", name=n)
    await papi.call("DeletePool", name=n)  # deleting a deleting pool: OK
    await papi.wait_gone(n)
    assert n not in [p for p, _ in await lease_client.pools()]
    # The name is free again.
    again = await papi.create(n, pool_tier="cold")
    assert again.current_status == "RUNNING"


async def test_a_deleting_pool_refuses_changes_but_its_leases_keep_working(
    papi: PoolApi, lease_client: Client
) -> None:
    n = name()
    await papi.create(n)  # ad_hoc_single: one VM
    lease = await lease_retrying(lease_client, n, str(uuid.uuid4()))
    running = await papi.wait_status(n, "RUNNING")  # all at max_size leased: RUNNING
    assert not running.reconciling
    await papi.call("DeletePool", name=n)
    deleting = await papi.pool(n)
    assert (deleting.current_status, deleting.desired_status) == ("DELETING", "DELETED")
    assert n not in [p for p, _ in await lease_client.pools()]
    for method in ("ResumePool", "PausePool", "StopPool", "UpdatePool"):
        assert await papi.code(method, name=n) == "FAILED_PRECONDITION", method
    with pytest.raises(RpcError) as err:
        await lease_client.lease(n)
    assert err.value.code == "FAILED_PRECONDITION" and "DELETED" in err.value.message
    got = await lease_client.get_lease(lease.instance)
    extended = await lease_client.extend_to(lease.instance, got.expires)
    assert extended.instance == lease.instance
    await asyncio.sleep(0.5)
    assert await papi.pool(n) is not None  # a leased VM keeps the pool
    await lease_client.return_(lease.instance)
    await papi.wait_gone(n)


async def test_config_pool_pause_and_resume_survive_in_the_database(
    papi: PoolApi, lease_client: Client, server: Running
) -> None:
    await papi.call("PausePool", name="cfg")
    try:
        await papi.wait_status("cfg", "PAUSED")
        rows = await server.sql("SELECT desired_status FROM pools WHERE name = 'cfg'")
        assert rows[0]["desired_status"] == "PAUSED"
        with pytest.raises(RpcError) as err:
            await lease_client.lease("cfg")
        assert err.value.code == "FAILED_PRECONDITION"
    finally:
        await papi.call("ResumePool", name="cfg")
    await papi.wait_status("cfg", "RUNNING")


async def test_queued_reservations_are_dropped_when_a_pool_stops(
    papi: PoolApi, lease_client: Client, server: Running
) -> None:
    n = name()
    await papi.create(n, pool_tier="cold")  # nothing warm, max 2
    first = await lease_retrying(lease_client, n, str(uuid.uuid4()))
    second = await lease_retrying(lease_client, n, str(uuid.uuid4()))
    rid = str(uuid.uuid4())
    with pytest.raises(RpcError) as err:
        await lease_client.lease(n, reservation_id=rid)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    await papi.call("StopPool", name=n)
    with pytest.raises(RpcError) as refused:  # the queued reservation's retry
        await lease_client.lease(n, reservation_id=rid)
    assert refused.value.code == "FAILED_PRECONDITION" and "STOPPED" in refused.value.message
    await eventually(
        lambda: server.sql("SELECT id FROM reservations WHERE pool = $1 AND NOT served", n),
        lambda rows: rows == [],
        10,
        "the queue dropped",
    )
    for lease in (first, second):
        await lease_client.return_(lease.instance)


# --- leases through VMPoolService -------------------------------------------------------


async def test_list_leases_and_stop_lease(papi: PoolApi, lease_client: Client) -> None:
    n = name()
    await papi.create(n, pool_tier="cold")
    a = await lease_retrying(lease_client, n, str(uuid.uuid4()))
    b = await lease_retrying(lease_client, n, str(uuid.uuid4()))
    listed = (await papi.call("ListLeases", pool_name=n)).leases
    assert {x.name for x in listed} == {a.instance, b.instance}
    assert all(x.pool_name == n for x in listed)
    keys = [(x.expiration_time.seconds, x.expiration_time.nanos, x.name) for x in listed]
    assert keys == sorted(keys)
    every = (await papi.call("ListLeases", pool_name="")).leases
    assert {a.instance, b.instance} <= {x.name for x in every}
    assert await papi.code("ListLeases", pool_name="nope") == "NOT_FOUND"
    for bad, code in (("x" * 5000, "INVALID_ARGUMENT"), ("nope", "NOT_FOUND")):
        with pytest.raises(RpcError) as err:
            await papi.call("ListLeases", pool_name=bad)
        assert (err.value.code, err.value.message[:10]) == (code, "pool_name:")
        assert len(err.value.message) < 200

    await papi.call("StopLease", lease_name=a.instance)  # no service tag needed
    with pytest.raises(RpcError) as err:
        await lease_client.get_lease(a.instance)
    assert err.value.code == "NOT_FOUND"
    assert await papi.code("StopLease", lease_name=a.instance) == "NOT_FOUND"
    assert await papi.code("StopLease", lease_name="") == "INVALID_ARGUMENT"
    await lease_client.return_(b.instance)


# --- the ad-hoc flow, replicas, restarts -------------------------------------------------


async def test_ad_hoc_flow_deletes_the_pool_while_its_lease_runs(
    papi: PoolApi, lease_client: Client
) -> None:
    n = f"adhoc-lease-Max-Mustermann-{uuid.uuid4().hex[:20]}"
    created = await papi.create(n, runtime="", intrinsic_os="")
    assert created.spec.runtime == RUNTIME
    lease = await lease_retrying(lease_client, created.name, str(uuid.uuid4()))
    await papi.call("DeletePool", name=created.name)
    assert (await lease_client.get_lease(lease.instance)).pool == n
    await lease_client.return_(lease.instance)
    await papi.wait_gone(n)


async def test_two_replicas_see_a_new_pool_at_once_and_a_restart_keeps_it(
    start_server: Callable[..., Awaitable[Running]],
    server: Running,
    pool_modules: tuple[ModuleType, ModuleType],
    client_factory: Callable[[str, str], Client],
) -> None:
    other = await start_server(CONFIG_POOLS, db_url=server.db_url, name="replica", **EXTRA)
    here, there = PoolApi(pool_modules, server.address), PoolApi(pool_modules, other.address)
    try:
        n = name()
        created = await here.create(n, pool_tier="cold")
        seen = await there.pool(n)  # no wait: the other replica reads the database
        assert seen is not None and seen.spec == created.spec
        lease = await lease_retrying(client_factory("grpcio", other.address), n, str(uuid.uuid4()))
        assert lease.pool == n
        other.proc.__exit__()
        third = await start_server(CONFIG_POOLS, db_url=server.db_url, name="restarted", **EXTRA)
        again = PoolApi(pool_modules, third.address)
        try:
            assert (await again.pool(n)).spec == created.spec
        finally:
            await again.close()
    finally:
        await here.close()
        await there.close()


async def test_mutating_calls_from_loopback_are_served(papi: PoolApi) -> None:
    # Authentication is off in these tests; the caller is 127.0.0.1 (pool_access.py).
    n = name()
    assert (await papi.create(n, pool_tier="cold")).name == n


async def test_a_spec_change_rolls_the_pool_and_leased_vms_are_not_reused(
    papi: PoolApi, lease_client: Client, server: Running
) -> None:
    n = name()
    await papi.create(n, pool_tier="small")  # min_ready 2, max_size 3
    await papi.wait_status(n, "RUNNING")
    lease = await lease_client.lease(n)

    async def free() -> set[str]:
        rows = await server.sql("SELECT name FROM instances WHERE pool = $1 AND state = 'ready'", n)
        return {r["name"] for r in rows}

    await eventually(free, lambda f: len(f) == 2, 10, "the pool refilled")
    old = await free()
    updated = await update(papi, n, ["spec.runtime"], runtime="intrinsic.platform.20270202.RC02")
    assert updated.reconciling  # old-spec VMs are still free
    await papi.wait_status(n, "RUNNING")
    assert not (await free()) & old, "free VMs of the old spec were replaced"
    hashes = await server.sql(
        "SELECT name, spec_hash FROM instances WHERE pool = $1 AND state = 'ready'", n
    )
    assert len({r["spec_hash"] for r in hashes}) == 1
    # The leased VM of the old spec runs on until its lease ends; it is not reused.
    assert (await lease_client.get_lease(lease.instance)).pool == n
    await lease_client.return_(lease.instance)
    gone = await server.sql("SELECT state FROM instances WHERE name = $1", lease.instance)
    assert [r["state"] for r in gone] in ([], ["destroying"])


async def test_metrics_count_pools_by_status(papi: PoolApi, server: Running) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{server.proc.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "vmpool_pools":
                    out[s.labels["status"]] = s.value
        return out

    async def paused() -> float:
        return (await asyncio.to_thread(scrape)).get("PAUSED", 0.0)

    before = await paused()
    n = name()
    await papi.create(n, pool_tier="cold")
    await papi.call("PausePool", name=n)
    await eventually(paused, lambda v: v >= before + 1, 15, "vmpool_pools{status=PAUSED} up by one")
    assert set(await asyncio.to_thread(scrape)) >= {"RUNNING", "PAUSED", "DELETING"}
