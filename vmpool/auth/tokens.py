"""Where a token travels: `authorization: Bearer <token>`, or the `auth-proxy`
cookie the Go client sends (`cookie: auth-proxy=<JWT>; org-id=...`)."""

from __future__ import annotations

from collections.abc import Iterable

from vmpool.auth.principal import Unauthenticated

MAX_TOKEN = 16 * 1024  # a JWT this long is not one: refuse before parsing it
COOKIE = "auth-proxy"


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def bearer_token(headers: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The caller's token, None when none is sent; Unauthenticated if malformed."""
    authorization: list[str] = []
    cookies: list[str] = []
    for key, value in headers:
        name = key.lower()
        if name == "authorization":
            authorization.append(_text(value))
        elif name == "cookie":
            cookies.append(_text(value))
    if authorization:
        if len(authorization) > 1:
            raise Unauthenticated("authorization: sent more than once")
        scheme, _, token = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated('authorization: expected "Bearer <token>"')
        return _checked(token.strip())
    for header in cookies:
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name == COOKIE:
                value = value.strip().strip('"')
                if not value:
                    raise Unauthenticated(f"cookie {COOKIE}: empty")
                return _checked(value)
    return None


def _checked(token: str) -> str:
    if len(token) > MAX_TOKEN:
        raise Unauthenticated(f"token: longer than {MAX_TOKEN} bytes")
    # "!" to "~": printable ASCII but the space; str methods, not a loop per
    # character (a ServiceAccount token is about a kilobyte, read on every call).
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise Unauthenticated("token: not printable ASCII")
    return token
