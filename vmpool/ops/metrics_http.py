"""The Prometheus endpoint: GET /metrics, and 404 for every other path."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

PATH = "/metrics"

StartResponse = Callable[..., Any]


def metrics_app(
    registry: CollectorRegistry,
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    serve = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: metrics are at /metrics\n"]
        return serve(environ, start_response)  # type: ignore[no-any-return]

    return app


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serve ``registry`` on host:port from a daemon thread; returns the server."""
    family_host = host.strip("[]") or "0.0.0.0"

    class Server(ThreadingWSGIServer):
        address_family = ThreadingWSGIServer.address_family

    if ":" in family_host:
        Server.address_family = socket.AF_INET6
    httpd = make_server(
        family_host, port, metrics_app(registry), Server, handler_class=_SilentHandler
    )
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd
