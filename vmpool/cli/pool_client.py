"""Calls to VMPoolService from the CLI (`vmpool pool ...` and the ad-hoc lease)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from vmpool.cli.connection import Connection
from vmpool.proto.intrinsic_proto.vmpoolapi import v1 as papi

DEFAULT_TIER = "ad_hoc_single"
DEFAULT_HW_TEMPLATE = "default"


def stub(conn: Connection) -> papi.VmPoolServiceStub:
    return papi.VmPoolServiceStub(conn.channel)


async def call(conn: Connection, method: Callable[..., Awaitable[Any]], request: Any) -> Any:
    return await method(request, timeout=conn.timeout, metadata=conn.call_metadata())


async def listed(conn: Connection, name: str) -> papi.Pool | None:
    reply = await call(conn, stub(conn).list_pools, papi.ListPoolsRequest())
    return next((p for p in reply.pools if p.name == name), None)
