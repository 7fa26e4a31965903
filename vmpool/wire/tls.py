"""TLS for the gRPC port (identity.md section 1): ALPN h2, optional client
certificates, and certificates re-read when their files change (cert-manager
rotates them in place) without dropping connections: each new handshake checks
the files' mtimes and, when they changed, is served by a freshly loaded context.
Connections already open keep the certificate they started with."""

from __future__ import annotations

import os
import ssl
import threading

import structlog

from vmpool.config.schema import TlsConfig

log = structlog.get_logger("vmpool.tls")


class TlsError(Exception):
    """The configured files cannot be used; the message names the key."""


def _stamp(cfg: TlsConfig) -> tuple[tuple[int, int, int], ...]:
    """What tells a changed file: mtime, size and inode (a Secret volume swaps a
    symlink to a new directory, so the inode changes even within one mtime tick)."""
    out = []
    for path in (cfg.cert_file, cfg.key_file, cfg.client_ca_file):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st else (-1, -1, -1))
    return tuple(out)


def build_context(cfg: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (OSError, ssl.SSLError) as err:
        raise TlsError(f"tls.cert_file/key_file: cannot load {cfg.cert_file}: {err}") from None
    if cfg.client_ca_file:
        try:
            ctx.load_verify_locations(cafile=cfg.client_ca_file)
        except (OSError, ssl.SSLError) as err:
            raise TlsError(f"tls.client_ca_file: cannot load {cfg.client_ca_file}: {err}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class ReloadingContext:
    """The server's SSLContext; ``context`` is handed to the server once."""

    def __init__(self, cfg: TlsConfig) -> None:
        self._cfg = cfg
        self._lock = threading.Lock()
        self._stamp = _stamp(cfg)
        self.context = build_context(cfg)
        self._current = self.context
        self.context.sni_callback = self._on_hello
        self.reloads = 0

    def current(self) -> ssl.SSLContext:
        """The context for a new handshake: reloaded if the files changed."""
        stamp = _stamp(self._cfg)
        with self._lock:
            if stamp != self._stamp:
                try:
                    fresh = build_context(self._cfg)
                except TlsError as err:
                    # Mid-rotation (key written, cert not yet): keep the old one.
                    log.warning(
                        "tls reload failed; keeping the previous certificate", error=str(err)
                    )
                else:
                    self._current = fresh
                    self._stamp = stamp
                    self.reloads += 1
                    log.info("tls certificates reloaded", cert_file=self._cfg.cert_file)
            return self._current

    def _on_hello(self, sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        ctx = self.current()
        if ctx is not self.context:
            sslobj.context = ctx
