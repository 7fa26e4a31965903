"""What a caller may do (identity.md section 4): first matching entry wins.
Plain functions over the config; no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from vmpool.auth.principal import Principal
from vmpool.config.schema import AuthConfig, LimitsConfig, PolicyDefault, Role


@dataclass(frozen=True, slots=True)
class Grant:
    """The policy entry that applies to one caller, limits resolved."""

    subject: str  # the entry's subject, "default", or "anonymous"
    roles: frozenset[str]
    service_tags: tuple[str, ...]
    pools: tuple[str, ...]
    max_active_leases: int  # 0: no limit
    max_queued_reservations: int  # per pool; 0: no limit


def glob_allows(globs: tuple[str, ...] | list[str], value: str) -> bool:
    """``""`` matches only the empty value; other globs use ``*``/``?``."""
    for glob in globs:
        if glob == "":
            if value == "":
                return True
        elif glob == "*" or fnmatchcase(value, glob):  # "*": the common grant, no regex
            return True
    return False


def subject_matches(subject: str, principal: Principal) -> bool:
    if subject.startswith("group:"):
        group = subject.removeprefix("group:")
        return any(fnmatchcase(g, group) for g in principal.groups)
    if "*" in subject or "?" in subject:
        return fnmatchcase(principal.name, subject)
    return principal.name == subject


def _grant(subject: str, entry: PolicyDefault, limits: LimitsConfig) -> Grant:
    return Grant(
        subject=subject,
        roles=frozenset(entry.roles),
        service_tags=tuple(entry.service_tags),
        pools=tuple(entry.pools),
        max_active_leases=(
            limits.max_active_leases if entry.max_active_leases is None else entry.max_active_leases
        ),
        max_queued_reservations=(
            limits.max_queued_reservations
            if entry.max_queued_reservations is None
            else entry.max_queued_reservations
        ),
    )


def grant_for(
    principal: Principal, auth: AuthConfig, limits: LimitsConfig, *, loopback: bool
) -> Grant:
    """The caller's grant. With no authentication everyone is `anonymous`: any tag
    and pool, and the admin roles only from loopback (or when allowed)."""
    if not principal.authenticated:
        admin = loopback or auth.allow_anonymous_admin
        roles: list[Role] = ["lease", "pools", "admin"] if admin else ["lease"]
        return _grant(
            "anonymous", PolicyDefault(roles=roles, service_tags=["*"], pools=["*"]), limits
        )
    for entry in auth.policy:
        if subject_matches(entry.subject, principal):
            return _grant(entry.subject, entry, limits)
    return _grant("default", auth.default, limits)
