"""Provider errors: backends translate their own exceptions into these, once."""

from __future__ import annotations


class ProviderError(Exception):
    """A backend call failed; worth retrying later unless a subclass says otherwise."""

    retry_after: float | None = None


class NotFound(ProviderError):
    pass


class Conflict(ProviderError):
    pass


class Invalid(ProviderError):
    """The backend rejected what we sent (e.g. a bad template); retrying will not help."""


class TooManyRequests(ProviderError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerError(ProviderError):
    pass


class Unavailable(ProviderError):
    """The backend could not be reached."""
