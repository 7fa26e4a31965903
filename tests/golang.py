"""Build the grpc-go client of tests/gogrpc (acceptance checks and the bench's load
mode) in GOPATH mode against Debian's grpc-go sources (golang-google-grpc-dev)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SOURCES = sorted((Path(__file__).parent / "gogrpc").glob("*.go"))
GOPATH_SYSTEM = Path("/usr/share/gocode")


def go_available() -> bool:
    return (
        shutil.which("go") is not None and (GOPATH_SYSTEM / "src/google.golang.org/grpc").is_dir()
    )


def build_go_client(work: Path) -> Path:
    """Compile tests/gogrpc under ``work``; returns the binary (needs go_available())."""
    go = shutil.which("go")
    assert go is not None
    (work / "src/acc").mkdir(parents=True, exist_ok=True)
    for source in SOURCES:
        shutil.copy(source, work / "src/acc" / source.name)
    env = {
        **os.environ,
        "GOPATH": f"{work}:{GOPATH_SYSTEM}",
        "GO111MODULE": "off",
        "GOCACHE": str(work / "cache"),
    }
    binary = work / "acc"
    subprocess.run(
        [go, "build", "-o", str(binary), "./src/acc"], cwd=work, env=env, check=True, timeout=600
    )
    return binary
