"""An independent gRPC stack for the lease API: the .proto compiled with
grpcio-tools at test time (never committed), as the Go clients compile it."""

from __future__ import annotations

import functools
import importlib
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
PROTO = "intrinsic_proto/vmpoolleaseapi/v1/vmpoolleaseapi.proto"


@dataclass(frozen=True)
class GrpcioModules:
    pb2: ModuleType
    pb2_grpc: ModuleType
    timestamp_pb2: ModuleType
    empty_pb2: ModuleType


def compile_proto(
    out: Path, proto: str, root: Path = REPO / "api"
) -> tuple[ModuleType, ModuleType]:
    """The grpcio (pb2, pb2_grpc) modules of ``proto`` (a path under ``root``)."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc} on {proto}")
    base = proto.removesuffix(".proto").replace("/", ".")
    sys.path.insert(0, str(out))
    try:
        # The generated code imports itself by this absolute name.
        pb2 = importlib.import_module(f"{base}_pb2")
        pb2_grpc = importlib.import_module(f"{base}_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb2, pb2_grpc


def compile_lease_api(out: Path) -> GrpcioModules:
    pb2, pb2_grpc = compile_proto(out, PROTO)
    from google.protobuf import empty_pb2, timestamp_pb2

    return GrpcioModules(pb2, pb2_grpc, timestamp_pb2, empty_pb2)


POOL_PROTO = "intrinsic_proto/vmpoolapi/v1/vmpool_api.proto"


def compile_pool_api(out: Path) -> tuple[ModuleType, ModuleType]:
    """VMPoolService's grpcio modules, compiled from api/ as a Go client would."""
    return compile_proto(out, POOL_PROTO)


ADMIN_PROTO = "vmpool/admin/v1/admin.proto"


@functools.cache
def compile_admin_api() -> tuple[ModuleType, ModuleType]:
    """The extension and admin APIs' grpcio modules, compiled once per process:
    protobuf's default descriptor pool refuses a second file defining the same
    symbols. Compiled from a copy under another directory, since the module path
    vmpool.admin.v1 would collide with the vmpool package (the wire names come
    from the proto package, which stays)."""
    out = Path(tempfile.mkdtemp(prefix="vmpool-admin-pb-"))
    target = out / "src" / "admintest" / "admin.proto"
    target.parent.mkdir(parents=True)
    shutil.copy(REPO / "api" / ADMIN_PROTO, target)
    return compile_proto(out / "pb", "admintest/admin.proto", out / "src")
