"""One small client interface over two gRPC stacks, so every end-to-end check runs
through both: the project's grpclib + betterproto stubs, and grpcio stubs compiled
from the .proto at test time (an independent implementation, like grpc-go)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError

from tests.e2e.grpcio_stack import GrpcioModules
from vmpool.proto.intrinsic_proto.vmpoolleaseapi import v1 as api

SERVICE = "/intrinsic_proto.vmpoolleaseapi.v1.VMPoolLeaseService"
GO_ZERO = (-62135596800, 0)  # Go's time.Time{} as a Timestamp
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# A Timestamp argument: a datetime, raw (seconds, nanos) put on the wire as is, or None (absent).
Ts = datetime | tuple[int, int] | None


@dataclass(frozen=True)
class Lease:
    instance: str
    pool: str
    expires: datetime
    zone: str


class RpcError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


async def rpc_code(call: Awaitable[object]) -> str:
    """The call's status code: "OK", or the RpcError's."""
    try:
        await call
    except RpcError as err:
        return err.code
    return "OK"


def _seconds_nanos(ts: datetime | tuple[int, int]) -> tuple[int, int]:
    if isinstance(ts, tuple):
        return ts
    delta = ts - EPOCH
    seconds = delta.days * 86400 + delta.seconds
    return seconds, delta.microseconds * 1000


def _from_seconds(seconds: int, nanos: int) -> datetime:
    return EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


# --- wire helpers (for raw Timestamps and garbage bytes) ------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 as two's complement, 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def timestamp_field(number: int, seconds: int, nanos: int) -> bytes:
    """A Timestamp message field encoded by hand: any int64 seconds / int32 nanos."""
    body = b""
    if seconds:
        body += b"\x08" + _varint(seconds)
    if nanos:
        body += b"\x10" + _varint(nanos)
    return _varint(number << 3 | 2) + _varint(len(body)) + body


class _RawCodec(CodecBase):
    """grpclib codec that sends and returns bytes untouched."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


# --- the interface --------------------------------------------------------------------


class Client:
    name: str

    async def ping(self, timeout: float = 5.0) -> str:
        raise NotImplementedError

    async def lease(
        self,
        pool: str = "",
        expires: Ts = None,
        service_tag: str = "e2e",
        reservation_id: str | None = None,
        *,
        wait: str | None = None,
        timeout: float = 10.0,
    ) -> Lease:
        raise NotImplementedError

    async def return_(self, instance: str, service_tag: str = "e2e") -> None:
        raise NotImplementedError

    async def extend_to(
        self, instance: str, to: Ts, service_tag: str = "e2e", extend_only: bool = False
    ) -> Lease:
        raise NotImplementedError

    async def pools(self) -> list[tuple[str, list[tuple[str, str]]]]:
        raise NotImplementedError

    async def get_lease(self, instance: str) -> Lease:
        raise NotImplementedError

    async def raw(self, method: str, payload: bytes, timeout: float = 5.0) -> bytes:
        """Send ``payload`` as the request bytes of ``method``; the reply bytes."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class GrpclibClient(Client):
    """The project's own stack: grpclib + the committed betterproto stubs."""

    name = "grpclib"

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._channel = Channel(host, int(port))
        self._raw_channel = Channel(host, int(port), codec=_RawCodec())
        self._stub = api.VmPoolLeaseServiceStub(self._channel)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except GRPCError as err:
            raise RpcError(err.status.name, err.message or "") from None
        except (StreamTerminatedError, ConnectionError) as err:
            raise RpcError("UNAVAILABLE", str(err)) from None
        except AttributeError as err:
            # grpclib reuses a channel whose connection the server just dropped and
            # fails with "'Connection' object has no attribute '_transport'"
            # (vmagamedov/grpclib#110): to a caller, the server went away.
            if "_transport" not in str(err):
                raise
            raise RpcError("UNAVAILABLE", f"connection lost: {err}") from None

    @staticmethod
    def _lease(msg: api.Lease) -> Lease:
        return Lease(msg.instance, msg.pool, msg.expires, msg.zone)

    async def ping(self, timeout: float = 5.0) -> str:
        from betterproto.lib.google.protobuf import Empty

        reply = await self._call(self._stub.ping(Empty(), timeout=timeout))
        return str(reply.msg)

    async def lease(
        self,
        pool: str = "",
        expires: Ts = None,
        service_tag: str = "e2e",
        reservation_id: str | None = None,
        *,
        wait: str | None = None,
        timeout: float = 10.0,
    ) -> Lease:
        metadata = {"x-vmpool-wait": wait} if wait else None
        request = api.LeaseRequest(
            pool=pool, service_tag=service_tag, reservation_id=reservation_id
        )
        if isinstance(expires, tuple):
            data = bytes(request) + timestamp_field(2, *expires)
            reply_bytes = await self.raw("Lease", data, timeout=timeout, metadata=metadata)
            return self._lease(api.LeaseResponse().parse(reply_bytes).lease)
        if expires is not None:
            request.expires = expires
        reply = await self._call(self._stub.lease(request, timeout=timeout, metadata=metadata))
        return self._lease(reply.lease)

    async def return_(self, instance: str, service_tag: str = "e2e") -> None:
        await self._call(
            self._stub.return_(
                api.ReturnRequest(instance=instance, service_tag=service_tag), timeout=10
            )
        )

    async def extend_to(
        self, instance: str, to: Ts, service_tag: str = "e2e", extend_only: bool = False
    ) -> Lease:
        request = api.ExtendToRequest(
            instance=instance, service_tag=service_tag, extend_only=extend_only
        )
        if isinstance(to, tuple):
            data = bytes(request) + timestamp_field(2, *to)
            reply_bytes = await self.raw("ExtendTo", data)
            return self._lease(api.ExtendToResponse().parse(reply_bytes).lease)
        if to is not None:
            request.to = to
        reply = await self._call(self._stub.extend_to(request, timeout=10))
        return self._lease(reply.lease)

    async def pools(self) -> list[tuple[str, list[tuple[str, str]]]]:
        reply = await self._call(self._stub.pools(api.PoolsRequest(), timeout=10))
        return [(p.name, [(lb.key, lb.value) for lb in p.labels]) for p in reply.pools]

    async def get_lease(self, instance: str) -> Lease:
        reply = await self._call(
            self._stub.get_lease(api.GetLeaseRequest(instance=instance), timeout=10)
        )
        return self._lease(reply.lease)

    async def raw(
        self,
        method: str,
        payload: bytes,
        timeout: float = 5.0,
        metadata: dict[str, str] | None = None,
    ) -> bytes:
        async def go() -> bytes:
            async with self._raw_channel.request(
                f"{SERVICE}/{method}",
                Cardinality.UNARY_UNARY,
                bytes,
                bytes,
                timeout=timeout,
                metadata=metadata,
            ) as stream:
                await stream.send_message(payload, end=True)
                reply = await stream.recv_message()
                assert reply is not None
                return bytes(reply)

        result: bytes = await self._call(go())
        return result

    async def close(self) -> None:
        self._channel.close()
        self._raw_channel.close()


class GrpcioClient(Client):
    """grpcio (grpc.aio) with stubs compiled from api/ at test time."""

    name = "grpcio"

    def __init__(self, address: str, mods: GrpcioModules) -> None:
        self._m = mods
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = mods.pb2_grpc.VMPoolLeaseServiceStub(self._channel)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except grpc.aio.AioRpcError as err:
            raise RpcError(err.code().name, err.details() or "") from None

    def _ts(self, ts: datetime | tuple[int, int]) -> Any:
        seconds, nanos = _seconds_nanos(ts)
        return self._m.timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)

    @staticmethod
    def _lease(msg: Any) -> Lease:
        return Lease(
            msg.instance, msg.pool, _from_seconds(msg.expires.seconds, msg.expires.nanos), msg.zone
        )

    async def ping(self, timeout: float = 5.0) -> str:
        reply = await self._call(self._stub.Ping(self._m.empty_pb2.Empty(), timeout=timeout))
        return str(reply.msg)

    async def lease(
        self,
        pool: str = "",
        expires: Ts = None,
        service_tag: str = "e2e",
        reservation_id: str | None = None,
        *,
        wait: str | None = None,
        timeout: float = 10.0,
    ) -> Lease:
        request = self._m.pb2.LeaseRequest(pool=pool, service_tag=service_tag)
        if reservation_id is not None:
            request.reservation_id = reservation_id
        if expires is not None:
            request.expires.CopyFrom(self._ts(expires))
        metadata = (("x-vmpool-wait", wait),) if wait else None
        reply = await self._call(self._stub.Lease(request, timeout=timeout, metadata=metadata))
        return self._lease(reply.lease)

    async def return_(self, instance: str, service_tag: str = "e2e") -> None:
        await self._call(
            self._stub.Return(
                self._m.pb2.ReturnRequest(instance=instance, service_tag=service_tag), timeout=10
            )
        )

    async def extend_to(
        self, instance: str, to: Ts, service_tag: str = "e2e", extend_only: bool = False
    ) -> Lease:
        request = self._m.pb2.ExtendToRequest(
            instance=instance, service_tag=service_tag, extend_only=extend_only
        )
        if to is not None:
            request.to.CopyFrom(self._ts(to))
        reply = await self._call(self._stub.ExtendTo(request, timeout=10))
        return self._lease(reply.lease)

    async def pools(self) -> list[tuple[str, list[tuple[str, str]]]]:
        reply = await self._call(self._stub.Pools(self._m.pb2.PoolsRequest(), timeout=10))
        return [(p.name, [(lb.key, lb.value) for lb in p.labels]) for p in reply.pools]

    async def get_lease(self, instance: str) -> Lease:
        reply = await self._call(
            self._stub.GetLease(self._m.pb2.GetLeaseRequest(instance=instance), timeout=10)
        )
        return self._lease(reply.lease)

    async def raw(self, method: str, payload: bytes, timeout: float = 5.0) -> bytes:
        call = self._channel.unary_unary(
            f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None
        )
        result: bytes = await self._call(call(payload, timeout=timeout))
        return result

    async def close(self) -> None:
        await self._channel.close()


def make_client(kind: str, address: str, mods: GrpcioModules) -> Client:
    if kind == "grpclib":
        return GrpclibClient(address)
    return GrpcioClient(address, mods)
