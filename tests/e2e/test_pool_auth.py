"""Who may call VMPoolService with authentication on (pool-api.md section 7):
JWT callers over TLS through grpcio stubs compiled from the pool API's proto."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.e2e.conftest import Running
from tests.e2e.grpcio_stack import compile_pool_api
from tests.e2e.identity_kit import Issuer, Pki
from tests.polling import eventually

CONFIG_POOLS = [{"name": "cfg", "min_ready": 0, "max_size": 1}]


@pytest.fixture(scope="module")
def pool_modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    return compile_pool_api(tmp_path_factory.mktemp("grpcio-pool-auth"))


class Caller:
    def __init__(
        self, mods: tuple[ModuleType, ModuleType], address: str, ca: bytes, token: str
    ) -> None:
        self.pb2, pb2_grpc = mods
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(ca), grpc.access_token_call_credentials(token)
        )
        self._channel = grpc.aio.secure_channel(address, creds)
        self._stub = pb2_grpc.VMPoolServiceStub(self._channel)

    async def code(self, method: str, **fields: Any) -> str:
        request = getattr(self.pb2, f"{method}Request")(**fields)
        try:
            await getattr(self._stub, method)(request, timeout=10)
        except grpc.aio.AioRpcError as err:
            return str(err.code().name)
        return "OK"

    async def create(self, name: str) -> str:
        spec = self.pb2.Spec(pool_tier="ad_hoc_single", hardware_template="default")
        return await self.code("CreatePool", name=name, spec=spec)

    async def listed(self) -> dict[str, Any]:
        reply = await self._stub.ListPools(self.pb2.ListPoolsRequest(), timeout=10)
        return {p.name: p for p in reply.pools}

    async def close(self) -> None:
        await self._channel.close()


@pytest.fixture(scope="module")
async def secured(
    start_server: Callable[..., Awaitable[Running]],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Running, Pki, Issuer]]:
    pki = Pki(tmp_path_factory.mktemp("pool-pki"))
    issuer = Issuer()
    jwks = pki.root / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    server = pki.server()
    running = await start_server(
        CONFIG_POOLS,
        name="pool-auth",
        tls={"cert_file": str(server.cert), "key_file": str(server.key)},
        auth={
            "mode": "jwt",
            "jwt": {"issuer": issuer.url, "audiences": ["vmpool"], "jwks_file": str(jwks)},
            "policy": [
                {"subject": "alice", "roles": ["lease", "pools"]},
                {"subject": "bob", "roles": ["lease", "pools"]},
                {"subject": "group:ops", "roles": ["admin"]},
            ],
            "default": {"roles": ["lease"]},
        },
    )
    yield running, pki, issuer
    running.assert_clean_log()


async def test_owners_manage_their_pools_admin_manages_all(
    secured: tuple[Running, Pki, Issuer], pool_modules: tuple[ModuleType, ModuleType]
) -> None:
    running, pki, issuer = secured
    ca = pki.ca.read_bytes()
    alice, bob, carol, ops = (
        Caller(pool_modules, running.address, ca, issuer.token(sub, groups=groups))
        for sub, groups in (("alice", ()), ("bob", ()), ("carol", ()), ("olga", ("ops",)))
    )
    try:
        assert await alice.create("alice-pool") == "OK"
        rows = await running.sql("SELECT owner FROM pools WHERE name = 'alice-pool'")
        assert rows[0]["owner"] == "alice"
        assert await carol.create("carol-pool") == "PERMISSION_DENIED"  # no pools role
        assert "alice-pool" in await carol.listed()  # reads are open to every caller
        for method in ("PausePool", "StopPool", "DeletePool", "UpdatePool"):
            assert await bob.code(method, name="alice-pool") == "PERMISSION_DENIED", method
        assert await alice.code("PausePool", name="alice-pool") == "OK"
        assert await alice.code("ResumePool", name="alice-pool") == "OK"
        # Config pools: admin only.
        assert await alice.code("PausePool", name="cfg") == "PERMISSION_DENIED"
        assert await ops.code("PausePool", name="cfg") == "OK"
        assert await ops.code("ResumePool", name="cfg") == "OK"
        # Every pool's leases: admin only; one's own pool's: its owner.
        assert await alice.code("ListLeases", pool_name="") == "PERMISSION_DENIED"
        assert await alice.code("ListLeases", pool_name="alice-pool") == "OK"
        assert await ops.code("ListLeases", pool_name="") == "OK"
        # Admin may delete anyone's pool.
        assert await ops.code("DeletePool", name="alice-pool") == "OK"
        await eventually(
            alice.listed, lambda pools: "alice-pool" not in pools, 15, "alice-pool deleted"
        )
    finally:
        for c in (alice, bob, carol, ops):
            await c.close()


async def test_no_token_is_unauthenticated(
    secured: tuple[Running, Pki, Issuer], pool_modules: tuple[ModuleType, ModuleType]
) -> None:
    running, pki, _ = secured
    pb2, pb2_grpc = pool_modules
    channel = grpc.aio.secure_channel(
        running.address, grpc.ssl_channel_credentials(pki.ca.read_bytes())
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb2_grpc.VMPoolServiceStub(channel).ListPools(pb2.ListPoolsRequest(), timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
