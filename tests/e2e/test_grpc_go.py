"""The lease API through grpc-go, the stack `inctl` is built on.

tests/gogrpc/ calls every RPC as today's `inctl vm` does (empty
service_tag, expiry with nanoseconds compared exactly, one reservation id
reused on retry, gzip, health, unknown methods, 200 concurrent streams,
keepalive pings) and prints one PASS/FAIL line per check. It needs Go and
grpc-go's sources in GOPATH form (Debian: golang-go, golang-google-grpc-dev;
.ci/run installs them); without them it fails on CI (CI=true) and is skipped
elsewhere, the run's summary saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Running
from tests.e2e.identity_kit import Issuer, Pki
from tests.golang import build_go_client, go_available
from tests.prerequisites import require

# The first test's set-up compiles the Go client with an empty build cache (32-43 s
# on a loaded 2-core machine); the default 120 s would leave the test itself little.
pytestmark = pytest.mark.timeout(300)

POOL = {"name": "go", "min_ready": 2, "max_size": 4, "zone": "zone-go"}


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(go_available(), "Go with grpc-go sources (golang-go, golang-google-grpc-dev)")
    return build_go_client(tmp_path_factory.mktemp("gogrpc"))


@pytest.fixture(scope="module")
async def server(start_server) -> Running:  # type: ignore[no-untyped-def]
    running: Running = await start_server([POOL], name="go")
    await running.wait_ready("go", 2)
    return running


def _all_checks_pass(
    go_client: Path, args: list[str], checks: int, timeout: float, env: dict[str, str] | None = None
) -> None:
    """Run the Go client; no FAIL line, exit 0, and every one of its ``checks``
    printed PASS (a client that stopped early prints fewer lines)."""
    result = subprocess.run(
        [str(go_client), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("FAIL")] == [], result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    assert len([line for line in lines if line.startswith("PASS")]) == checks, result.stdout


async def test_inctl_calls_through_grpc_go(go_client: Path, server: Running) -> None:
    _all_checks_pass(go_client, [server.address, "go", "12s"], 18, timeout=120)
    server.assert_clean_log()


async def test_inctl_pool_commands_through_grpc_go(go_client: Path, server: Running) -> None:
    """`inctl vm pool create/update/pause/resume/delete`, `leases list/stop` and
    the ad-hoc `vm lease --runtime` flow, with inctl's waits (fields compared exactly)."""
    _all_checks_pass(go_client, [server.address, "--pools"], 33, timeout=400)
    server.assert_clean_log()


async def test_watch_leases_through_grpc_go(go_client: Path, server: Running) -> None:
    """WatchLeases as a server stream: first a heartbeat, then LEASED (expiry to
    the nanosecond), EXPIRING, EXTENDED, RETURNED; cancellation, resume after a
    cursor, a deadline, a bad cursor."""
    _all_checks_pass(go_client, [server.address, "--watch", "go"], 10, timeout=180)
    server.assert_clean_log()


@pytest.mark.parametrize("cookie", [False, True], ids=["bearer", "auth-proxy-cookie"])
async def test_grpc_go_over_tls_with_a_token(
    go_client: Path,
    start_server,  # type: ignore[no-untyped-def]
    tmp_path_factory: pytest.TempPathFactory,
    cookie: bool,
) -> None:
    """jwt mode over TLS: grpc-go sends the token per call (bearer, or inctl's
    cookie); the same checks pass, and a call without the token is UNAUTHENTICATED."""
    pki = Pki(tmp_path_factory.mktemp("go-pki"))
    issuer = Issuer()
    jwks = tmp_path_factory.mktemp("go-jwks") / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    cert = pki.server()
    running: Running = await start_server(
        [POOL],
        name="go-tls",
        tls={"cert_file": str(cert.cert), "key_file": str(cert.key)},
        auth={
            "mode": "jwt",
            "jwt": {"issuer": issuer.url, "audiences": ["vmpool"], "jwks_file": str(jwks)},
        },
    )
    await running.wait_ready("go", 2)
    env = {
        **os.environ,
        "ACC_CA": str(pki.ca),
        "ACC_TOKEN": issuer.token("ci-bot", lifetime=3600),
        "ACC_COOKIE": "1" if cookie else "",
    }
    _all_checks_pass(go_client, [running.address, "go"], 18, timeout=120, env=env)
    owners = await running.sql("SELECT DISTINCT principal FROM lease_history")
    assert [r["principal"] for r in owners] == ["ci-bot"]
    running.assert_clean_log()
