"""HOST:PORT, the one way every listen address and --server is read."""

from __future__ import annotations


def split_host_port(address: str, default_host: str = "") -> tuple[str, int]:
    """(host, port) of ``HOST:PORT``; an IPv6 host comes in brackets (``[::1]:80``),
    returned without them; an empty host is ``default_host``. ValueError unless
    the port is a number in 0..65535."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]") or default_host, int(port)
