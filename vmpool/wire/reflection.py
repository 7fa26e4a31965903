"""gRPC server reflection, so grpcurl works against `vmpool serve` without .proto files.

The descriptors come from the FileDescriptorSet that `python -m vmpool.wire.protogen`
writes next to the generated code (the freshness test keeps it current), so
every proto protogen knows is described; the services listed are the ones the
server actually serves.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from grpclib.health.v1 import health_pb2
from grpclib.reflection import _deprecated
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.utils import _service_name

from vmpool.wire.protogen import DESCRIPTORS

REFLECTION_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


def api_descriptors() -> descriptor_pool.DescriptorPool:
    """A descriptor pool of our protos, the health service's and reflection's own."""
    pool = descriptor_pool.DescriptorPool()
    data = resources.files("vmpool.proto").joinpath(DESCRIPTORS).read_bytes()
    files = list(descriptor_pb2.FileDescriptorSet.FromString(data).file)
    for module in (health_pb2, reflection_pb2, reflection_v1alpha_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    added: set[str] = set()
    for file in files:
        if file.name not in added:
            pool.Add(file)
            added.add(file.name)
    return pool


def with_reflection(services: Collection[Any]) -> list[Any]:
    """``services`` and the reflection services (v1 and v1alpha) describing them."""
    pool = api_descriptors()
    names = [*(_service_name(s) for s in services), *REFLECTION_SERVICES]
    return [
        *services,
        ServerReflection(_service_names=names, _pool=pool),
        _deprecated.ServerReflection(_service_names=names, _pool=pool),
    ]
