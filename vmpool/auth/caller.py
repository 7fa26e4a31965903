"""The caller of the RPC being served, and the checks handlers make against it.
This is the seam for other services: ``require_role("pools" | "admin")``."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from vmpool.auth.policy import Grant, glob_allows
from vmpool.auth.principal import ANONYMOUS, Principal
from vmpool.core.echo import echo
from vmpool.domain.leasing import PermissionDenied


@dataclass(frozen=True, slots=True)
class Caller:
    principal: Principal
    grant: Grant

    def owner(self, service_tag: str) -> str:
        return self.principal.owner(service_tag)


# Outside an RPC (tests, tools) the caller is anonymous with every role.
_UNRESTRICTED = Caller(
    ANONYMOUS,
    Grant("anonymous", frozenset({"lease", "pools", "admin"}), ("*",), ("*",), 0, 0),
)
# A public method's caller (no credentials asked): no roles at all.
PUBLIC = Caller(ANONYMOUS, Grant("public", frozenset(), (), (), 0, 0))
current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "caller", default=_UNRESTRICTED
)


def caller() -> Caller:
    return current_caller.get()


def has_role(role: str) -> bool:
    roles = caller().grant.roles
    return role in roles or "admin" in roles


def require_role(role: str) -> Caller:
    """PERMISSION_DENIED unless the caller holds ``role`` (admin holds them all)."""
    who = caller()
    if not has_role(role):
        if not who.principal.authenticated:
            raise PermissionDenied(
                f"role {role}: anonymous callers get it only from loopback "
                "(set auth.allow_anonymous_admin or enable authentication)"
            )
        raise PermissionDenied(f'role {role}: not granted to "{echo(who.principal.name)}"')
    return who


def check_service_tag_allowed(tag: str) -> None:
    who = caller()
    if not glob_allows(who.grant.service_tags, tag):
        raise PermissionDenied(
            f'service_tag: "{echo(tag)}" is not allowed for "{echo(who.principal.name)}"'
        )


def check_pool_allowed(pool: str) -> None:
    who = caller()
    if not glob_allows(who.grant.pools, pool):
        raise PermissionDenied(
            f'pool: "{echo(pool)}" is not allowed for "{echo(who.principal.name)}"'
        )
