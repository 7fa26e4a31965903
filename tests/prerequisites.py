"""What some tests need of the machine (Go, an address that is not loopback).

On CI (``CI=true``; .ci/run sets it) a missing prerequisite fails the test: CI
must run it. Elsewhere the test is skipped, and the run's summary lists every
skip with its reason (tests/conftest.py).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require(ok: bool, what: str) -> None:
    """Go on if ``ok``; else fail on CI and skip elsewhere, naming ``what`` is missing."""
    if ok:
        return
    if on_ci():
        pytest.fail(f"missing on CI, where this test must run: {what}", pytrace=False)
    pytest.skip(f"missing: {what}")


def _routed_address() -> str | None:
    """The address this machine would send from towards a private network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


def _interface_address() -> str | None:
    """Any IPv4 address of an interface that is not loopback (no route needed)."""
    ip = shutil.which("ip")
    if ip is None:
        return None
    out = subprocess.run([ip, "-j", "-4", "addr"], capture_output=True, text=True, check=False)
    try:
        interfaces = json.loads(out.stdout or "[]")
    except ValueError:
        return None
    for interface in interfaces:
        for info in interface.get("addr_info", []):
            local = info.get("local", "")
            if local and not ipaddress.ip_address(local).is_loopback:
                return str(local)
    return None


@contextmanager
def non_loopback_address() -> Iterator[str | None]:
    """An IPv4 address of this machine that is not loopback, for a client whose
    peer address must not be 127.x: the machine's own, or (as root, when it has
    none) one of 198.18.0.0/15 (RFC 2544, never routed) added to ``lo`` for the
    duration: an address on ``lo`` outside 127/8 is not a loopback address.
    None when there is none and none can be added."""
    address = _routed_address() or _interface_address()
    if address is not None:
        yield address
        return
    ip = shutil.which("ip")
    if ip is None or os.geteuid() != 0:
        yield None
        return
    added = f"198.{random.randint(18, 19)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    result = subprocess.run(
        [ip, "addr", "add", f"{added}/32", "dev", "lo"], capture_output=True, check=False
    )
    if result.returncode != 0:
        yield None
        return
    try:
        yield added
    finally:
        subprocess.run([ip, "addr", "del", f"{added}/32", "dev", "lo"], check=False)
