"""Generate betterproto code from api/ (used by `nox -s protos` and the staleness test),
and the FileDescriptorSet of the same protos that server reflection serves."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

API = Path(__file__).resolve().parents[2] / "api"
DESCRIPTORS = "descriptors.binpb"  # in the generated package, next to the code
PROTOS = [
    "intrinsic_proto/vmpoolleaseapi/v1/vmpoolleaseapi.proto",
    "intrinsic_proto/vmpoolapi/v1/vmpool_api.proto",
    "vmpool/admin/v1/admin.proto",
]


def generate(out: Path, protos: list[str]) -> None:
    """Write the generated package tree for ``protos`` into ``out`` (replaced)."""
    plugin = shutil.which("protoc-gen-python_betterproto", path=str(Path(sys.executable).parent))
    if plugin is None:
        raise SystemExit(
            "protoc-gen-python_betterproto not found: pip install 'betterproto[compiler]'"
        )
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--plugin=protoc-gen-python_betterproto={plugin}",
                f"-I{API}",
                f"--python_betterproto_out={tmp}",
                *protos,
            ],
            check=True,
            capture_output=True,
            # Away from the checkout: the plugin would take our own `vmpool`
            # package for the proto package of that name and skip its __init__.
            cwd=tmp,
        )
        # Every proto generated here is also served by reflection (vmpool.wire.reflection).
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{API}",
                f"--descriptor_set_out={Path(tmp) / DESCRIPTORS}",
                "--include_imports",
                *protos,
            ],
            check=True,
            capture_output=True,
        )
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)
        (out / "py.typed").unlink(missing_ok=True)


def main() -> None:
    generate(Path(sys.argv[1]), sys.argv[2:] or PROTOS)


if __name__ == "__main__":
    main()
