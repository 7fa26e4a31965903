"""How client-supplied values appear in status messages and logs: cut short.

h2's header encoding is quadratic in a header's length, so a long value echoed
into ``grpc-message`` costs minutes of CPU; logs must stay readable lines.
"""

from __future__ import annotations

ECHO_CHARS = 64  # a value quoted back to the client or into a log
MAX_STATUS_MESSAGE = 1024  # characters of a grpc-message, before percent-encoding


def echo(value: str | bytes, limit: int = ECHO_CHARS) -> str:
    """``value`` as text, cut to ``limit`` characters followed by ``...(N bytes)``."""
    if isinstance(value, bytes):
        size = len(value)
        text = value[: limit * 4].decode("utf-8", "replace")
    else:
        if len(value) <= limit:
            return value
        text = value
        size = len(value.encode("utf-8", "surrogatepass"))
    if len(text) <= limit and len(text.encode("utf-8", "surrogatepass")) == size:
        return text
    return f"{text[:limit]}...({size} bytes)"


def status_message(message: str) -> str:
    """A status message of at most MAX_STATUS_MESSAGE characters."""
    if len(message) <= MAX_STATUS_MESSAGE:
        return message
    return echo(message, MAX_STATUS_MESSAGE - 24)
