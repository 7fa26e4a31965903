"""What the identity end-to-end tests make for themselves: a CA with server and
client certificates (the `cryptography` package), signing keys and a JWKS, and a
grpcio client over TLS that sends per-call credentials as grpc-go does."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.e2e.clients import GrpcioClient, RpcError
from tests.e2e.grpcio_stack import GrpcioModules

ADMIN = "/vmpool.admin.v1.VMPoolAdminService/"
EXTENSION = "/vmpool.admin.v1.VMPoolExtensionService/"


def _pem_key(key: Any) -> bytes:
    out: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return out


@dataclass
class Issued:
    cert: Path
    key: Path

    def pair(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


class Pki:
    """A throwaway CA under ``root``; ``issue`` writes a leaf certificate and key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmpool test CA")])
        now = dt.datetime.now(dt.UTC)
        self._name = name
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = root / "ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        *,
        cn: str,
        dns: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        x509.ExtendedKeyUsageOID.SERVER_AUTH
                        if server
                        else x509.ExtendedKeyUsageOID.CLIENT_AUTH
                    ]
                ),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        out = Issued(self.root / f"{name}.pem", self.root / f"{name}-key.pem")
        out.key.write_bytes(_pem_key(key))
        out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return out

    def server(self, name: str = "server") -> Issued:
        return self.issue(name, cn="vmpool", dns=("localhost",), ips=("127.0.0.1",), server=True)


class Issuer:
    """An OIDC issuer's signing keys; ``jwks()`` is what its JWKS endpoint serves."""

    def __init__(self, url: str = "https://issuer.test") -> None:
        self.url = url
        self.keys: dict[str, Any] = {}
        self.rotate()

    def rotate(self) -> str:
        kid = uuid.uuid4().hex[:12]
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = kid
        return kid

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": keys}

    def token(
        self,
        sub: str,
        *,
        groups: tuple[str, ...] = (),
        audience: str = "vmpool",
        lifetime: float = 600,
        kid: str | None = None,
        issuer: str | None = None,
        key: Any = None,
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": issuer or self.url,
            "sub": sub,
            "aud": audience,
            "iat": now,
            "exp": now + int(lifetime),
            "groups": list(groups),
        }
        signer = key or self.keys[kid or self.kid]
        return jwt.encode(claims, signer, algorithm="RS256", headers={"kid": kid or self.kid})


class _Headers(grpc.AuthMetadataPlugin):
    def __init__(self, headers: tuple[tuple[str, str], ...]) -> None:
        self._headers = headers

    def __call__(self, context: Any, callback: Any) -> None:
        callback(self._headers, None)


class TlsClient(GrpcioClient):
    """grpcio over TLS; ``token`` goes as per-call credentials (`authorization:
    Bearer`, as grpc-go's oauth credentials send it), ``cookie`` as the Go
    client's `auth-proxy` cookie."""

    def __init__(
        self,
        address: str,
        mods: GrpcioModules,
        ca: Path,
        *,
        identity: Issued | None = None,
        token: str | None = None,
        cookie: str | None = None,
    ) -> None:
        key, chain = identity.pair() if identity else (None, None)
        creds = grpc.ssl_channel_credentials(ca.read_bytes(), key, chain)
        calls = []
        if token is not None:
            calls.append(grpc.access_token_call_credentials(token))
        if cookie is not None:
            calls.append(
                grpc.metadata_call_credentials(
                    _Headers((("cookie", f"org-id=7; auth-proxy={cookie}"),))
                )
            )
        if calls:
            creds = grpc.composite_channel_credentials(creds, *calls)
        self._m = mods
        self._channel = grpc.aio.secure_channel(address, creds)
        self._stub = mods.pb2_grpc.VMPoolLeaseServiceStub(self._channel)

    async def admin(self, method: str, request: bytes = b"", service: str = ADMIN) -> bytes:
        """A call of the admin API (or ``service``), raw bytes in and out."""
        call = self._channel.unary_unary(service + method)
        try:
            reply: bytes = await call(request, timeout=10)
        except grpc.aio.AioRpcError as err:
            raise RpcError(err.code().name, err.details() or "") from None
        return reply


def plaintext_client(address: str, mods: GrpcioModules) -> GrpcioClient:
    return GrpcioClient(address, mods)
