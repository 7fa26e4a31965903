"""Building the configured authenticator, and the start-up warnings about it."""

from __future__ import annotations

import ipaddress
from contextlib import AsyncExitStack

from vmpool.auth.authenticator import Authenticator
from vmpool.config.schema import Config
from vmpool.core.address import split_host_port


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_warnings(config: Config, addresses: list[str]) -> list[str]:
    """What an operator should hear at start: credentials without TLS, or no
    authentication on an address others can reach."""
    out = []
    if config.auth.mode != "none" and not config.tls.enabled:
        out.append(
            f"auth.mode {config.auth.mode} without TLS: tokens travel in clear text and "
            "grpc-go clients send no per-call credentials; set tls.cert_file and tls.key_file"
        )
    if config.auth.mode == "none":
        for address in addresses:
            if address and not _is_loopback_host(split_host_port(address)[0]):
                out.append(
                    f"auth.mode none on {address}: anyone who can reach it can lease, extend "
                    "and return anyone's VMs by naming their service_tag; set auth.mode"
                )
    if config.auth.allow_anonymous_admin and config.auth.mode == "none":
        out.append(
            "auth.allow_anonymous_admin: anyone who can reach the port may use the admin API"
        )
    return out


async def build_authenticator(config: Config, stack: AsyncExitStack) -> Authenticator:
    """Raises ValueError naming the key when the identity provider cannot be set up."""
    mode = config.auth.mode
    if mode == "kubernetes":
        # lazy: kubernetes_asyncio takes seconds to import; only auth.mode kubernetes needs it
        from vmpool.auth.kubernetes import TokenReviewer, load_api_client

        api = await load_api_client(config.auth.kubernetes.kubeconfig)
        stack.push_async_callback(api.close)
        reviewer = TokenReviewer(
            api,
            config.auth.kubernetes.audiences,
            config.auth.kubernetes.cache_ttl.total_seconds(),
        )
        return Authenticator(config, reviewer)
    if mode == "jwt":
        from vmpool.auth.oidc import JwtVerifier  # lazy: only auth.mode jwt needs it

        verifier = JwtVerifier(config.auth.jwt)
        stack.push_async_callback(verifier.close)
        return Authenticator(config, verifier)
    return Authenticator(config)
