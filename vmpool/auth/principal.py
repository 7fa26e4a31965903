"""The caller as the service sees it, and the errors authentication can end in."""

from __future__ import annotations

from dataclasses import dataclass


class Unauthenticated(Exception):
    """A missing, malformed, expired or rejected credential: the client should log in again."""


class AuthUnavailable(Exception):
    """The identity provider (TokenReview, JWKS) cannot be reached: retry, never allow."""


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    groups: tuple[str, ...] = ()
    authenticated: bool = True

    def owner(self, service_tag: str) -> str:
        """Who a quota counts against: the principal, or with no authentication the tag."""
        return self.name if self.authenticated else service_tag


ANONYMOUS = Principal("anonymous", (), authenticated=False)
