"""The `--auth` phase: the cost of TLS and the kubernetes auth mode (issue 23 item 5).

Two `vmpool serve` processes on fresh databases, the versus configuration
(tests/bench/versus.py): one plain, one with TLS and `auth.mode: kubernetes`
against tests/fakekube (TokenReview). The grpc-go generator (TLS, a bearer
ServiceAccount token per call) loops Lease -> Return at c=64 over 8
connections on each, interleaved for a few rounds. Reported: server CPU per
Lease or Return RPC with auth / without (target: within 10 %), the
TokenReviews the fake API server answered against the calls made (the token
cache's hit rate) and the cache TTL (how long a revoked token keeps working).
"""

from __future__ import annotations

import asyncio
import base64
import random
import statistics
import time
from pathlib import Path
from typing import Any

import jwt

from tests.bench.versus import (
    POOL,
    VMPOOL_CONFIG,
    GoGenerator,
    Side,
    measure,
    ready,
)
from tests.e2e.identity_kit import Pki
from tests.fakekube.server import FakeKube, ServiceAccountToken
from tests.golang import build_go_client, go_available
from tests.pg import TestPostgres
from tests.server import ServerProcess


def service_account_token() -> str:
    """A token shaped and sized like a projected ServiceAccount token (an RS256
    JWT of about a kilobyte): the server reads and hashes the whole token on
    every call, so a short stand-in measured less than a real client costs."""
    now = int(time.time())
    claims = {
        "aud": ["vmpool"],
        "exp": now + 86400,
        "iat": now,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "jti": "5f0c9a52-0d0e-4c4e-9b1f-3c1f2f4b8e21",
        "kubernetes.io": {
            "namespace": "bench",
            "node": {"name": "node-a", "uid": "0b7b8a1e-6f2c-4f5e-8d7a-2b9c4e6f1a3d"},
            "pod": {"name": "load-7d9f8b6c5-x2x9q", "uid": "9c1e2d3f-4a5b-6c7d-8e9f-0a1b2c3d4e5f"},
            "serviceaccount": {"name": "load", "uid": "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d"},
            "warnafter": now + 3607,
        },
        "nbf": now,
        "sub": "system:serviceaccount:bench:load",
    }
    unsigned = jwt.encode(
        claims, "a bench key; the signature is replaced", algorithm="HS256"
    ).rsplit(".", 1)[0]
    signature = base64.urlsafe_b64encode(random.Random(23).randbytes(256)).rstrip(b"=")
    return f"{unsigned}.{signature.decode()}"


TOKEN = service_account_token()
CACHE_TTL = "60s"  # the default; a revoked token keeps working at most this long


async def compare(
    work: Path, pg: TestPostgres, *, duration: float, warmup: float, rounds: int, log: Any = print
) -> dict[str, Any]:
    if not go_available():
        return {"skipped": "Go with grpc-go sources is not installed"}
    binary = await asyncio.to_thread(build_go_client, work / "go")
    pki = Pki(work / "pki")
    cert = pki.server()
    kube = FakeKube()
    await kube.start()
    kube.service_tokens = {
        TOKEN: ServiceAccountToken(
            "system:serviceaccount:bench:load",
            ["system:serviceaccounts", "system:authenticated"],
            ["vmpool"],
        )
    }
    configs = {
        "plain": VMPOOL_CONFIG,
        "auth": {
            **VMPOOL_CONFIG,
            "tls": {"cert_file": str(cert.cert), "key_file": str(cert.key)},
            "auth": {
                "mode": "kubernetes",
                "kubernetes": {
                    "kubeconfig": str(kube.write_kubeconfig(work / "kubeconfig")),
                    "cache_ttl": CACHE_TTL,
                },
            },
        },
    }
    gens = {
        "plain": GoGenerator(binary),
        "auth": GoGenerator(binary, {"ACC_CA": str(pki.ca), "ACC_TOKEN": TOKEN}),
    }
    servers: list[ServerProcess] = []
    try:
        sides: dict[str, Side] = {}
        for name, cfg in configs.items():
            url = await pg.fresh()
            server = ServerProcess(cfg, work / name, database_url=url, metrics_port=0, name=name)
            servers.append(server)
            await asyncio.to_thread(server.start)
            assert server.proc is not None
            await ready(url, 400)
            sides[name] = Side(name, [server.proc.pid], server.address, pg, url)
        phases: dict[str, list[dict[str, Any]]] = {"plain": [], "auth": []}
        reviews0 = kube.token_reviews
        for i in range(rounds):
            for name in ("plain", "auth") if i % 2 == 0 else ("auth", "plain"):
                await ready(sides[name].url, 390)
                r = await measure(sides[name], gens[name], "lease", 64, duration, warmup)
                phases[name].append(r)
                log(
                    f"auth round {i + 1} {name} lease c=64: {r['calls_per_s']}/s, server "
                    f"{r.get('server_cpu_ms_per_call')} ms/call, errors {r['errors']}"
                )
        reviews = kube.token_reviews - reviews0
        ratios = [
            round(a["server_cpu_ms_per_call"] / p["server_cpu_ms_per_call"], 3)
            for a, p in zip(phases["auth"], phases["plain"], strict=True)
            if a.get("server_cpu_ms_per_call") and p.get("server_cpu_ms_per_call")
        ]
        # Every call of the auth side carried the token: calls in the windows are
        # a lower bound of those made (warm-up and tail excluded).
        calls = sum(
            v["calls"]
            for r in phases["auth"]
            for k, v in r.items()
            if k in ("lease", "return") and isinstance(v, dict)
        )
        return {
            "generator": "grpc-go (TLS, bearer ServiceAccount token)",
            "pool": POOL,
            "rounds": phases,
            "cpu_ratio_rounds": ratios,
            "cpu_ratio": round(statistics.median(ratios), 3) if ratios else None,
            "token_reviews": reviews,
            "authenticated_calls_at_least": calls,
            "cache_hit_rate_at_least": round(1 - reviews / calls, 5) if calls else None,
            "cache_ttl": CACHE_TTL,
        }
    finally:
        for server in servers:
            server.__exit__()
        await kube.stop()
