"""Identity from a verified client certificate: URI SAN (e.g. spiffe://...), else
DNS SAN, else the subject's CN. The TLS layer has already verified the chain."""

from __future__ import annotations

from typing import Any

from vmpool.auth.principal import Principal, Unauthenticated


def identity_of(cert: dict[str, Any] | None) -> Principal:
    """``cert`` is ``ssl.SSLObject.getpeercert()``: empty or None without a certificate."""
    if not cert:
        raise Unauthenticated("client certificate: required (auth.mode mtls)")
    sans = cert.get("subjectAltName", ())
    for kind in ("URI", "DNS"):
        for key, value in sans:
            if key == kind and value:
                return Principal(str(value))
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return Principal(str(value))
    raise Unauthenticated("client certificate: no URI SAN, DNS SAN or CN to name the caller")
