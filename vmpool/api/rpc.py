"""What every RPC shares: the call context, error translation, the canonical log
line and RPC metrics. Domain and store errors become gRPC statuses here, once."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from vmpool.auth.authenticator import Authenticator
from vmpool.auth.caller import PUBLIC, current_caller, require_role
from vmpool.auth.principal import AuthUnavailable, Principal, Unauthenticated
from vmpool.core import calltime
from vmpool.core.echo import echo, status_message
from vmpool.domain import leasing
from vmpool.ops.audit import audit_log
from vmpool.ops.metrics import Metrics
from vmpool.store.errors import unavailable

log = structlog.get_logger("vmpool.rpc")

# Calls that change nothing; every other call is a state change and gets an audit line.
_READS = ("Get", "List", "Describe", "Watch", "Check")
_READ_METHODS = {"Ping", "Pools", "PoolStats"}


def bind_principal(principal: Principal) -> None:
    """The caller on the call's log lines (and audit line): name and groups, cut."""
    if principal.groups:
        groups = [echo(g) for g in principal.groups[:8]]
        if len(principal.groups) > 8:
            groups.append(f"...({len(principal.groups) - 8} more)")
        structlog.contextvars.bind_contextvars(principal=echo(principal.name, 128), groups=groups)
    else:
        structlog.contextvars.bind_contextvars(principal=echo(principal.name, 128))


def is_state_change(method: str) -> bool:
    return method not in _READ_METHODS and not method.startswith(_READS)


current_stream: contextvars.ContextVar[Stream[Any, Any]] = contextvars.ContextVar("stream")

_STATUS: dict[type[leasing.ClientError], Status] = {
    leasing.InvalidArgument: Status.INVALID_ARGUMENT,
    leasing.NotFound: Status.NOT_FOUND,
    leasing.PermissionDenied: Status.PERMISSION_DENIED,
    leasing.Exhausted: Status.RESOURCE_EXHAUSTED,
    leasing.FailedPrecondition: Status.FAILED_PRECONDITION,
    leasing.AlreadyExists: Status.ALREADY_EXISTS,
    leasing.Unavailable: Status.UNAVAILABLE,
}


def to_grpc_error(err: Exception) -> GRPCError | None:
    if isinstance(err, GRPCError):
        return err
    if isinstance(err, leasing.ClientError):
        return GRPCError(_STATUS[type(err)], status_message(str(err)))
    if isinstance(err, Unauthenticated):
        return GRPCError(Status.UNAUTHENTICATED, str(err))
    if isinstance(err, AuthUnavailable):
        return GRPCError(Status.UNAVAILABLE, str(err))
    if unavailable(err):  # translated by the store, or a lost connection it did not see
        return GRPCError(Status.UNAVAILABLE, "database unavailable, retry later")
    return None


class Gate:
    """Counts calls in flight; once closed, new calls get UNAVAILABLE (clients retry
    elsewhere) while those already running finish."""

    def __init__(self) -> None:
        self.accepting = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if not self.accepting:
            raise GRPCError(Status.UNAVAILABLE, "server is shutting down, retry")
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting and wait for calls in flight; False if time ran out."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@functools.lru_cache(maxsize=4096)
def peer_text(peer: Any) -> str:
    """A peer address as the log line shows it, host:port ("" when unknown)."""
    return f"{peer[0]}:{peer[1]}" if peer else ""


def instrument(services: list[Any], metrics: Metrics, gate: Gate, auth: Authenticator) -> list[Any]:
    """Wrap every handler of ``services`` with authentication, context, error
    mapping, logs and metrics. A service's ``required_role`` attribute (e.g.
    "admin") is checked before any of its handlers runs."""
    return [_Instrumented(s, metrics, gate, auth) for s in services]


class _Instrumented:
    def __init__(self, service: Any, metrics: Metrics, gate: Gate, auth: Authenticator) -> None:
        self._service = service
        self._metrics = metrics
        self._gate = gate
        self._auth = auth
        self._role: str | None = getattr(service, "required_role", None)
        # Methods anyone may call without credentials (Ping: readiness probes).
        self._public: frozenset[str] = getattr(service, "public_methods", frozenset())

    def __mapping__(self) -> dict[str, Handler]:
        out = {}
        for path, handler in self._service.__mapping__().items():
            public = path.rsplit("/", 1)[-1] in self._public
            wrapped = _wrap(
                path,
                handler.func,
                self._metrics,
                self._gate,
                None if public else self._auth,
                self._role,
            )
            out[path] = Handler(
                wrapped, handler.cardinality, handler.request_type, handler.reply_type
            )
        return out


def _wrap(
    path: str,
    func: Callable[[Stream[Any, Any]], Awaitable[None]],
    metrics: Metrics,
    gate: Gate,
    auth: Authenticator | None,
    role: str | None,
) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
    """``auth`` None: a public method, served without credentials."""
    method = path.rsplit("/", 1)[-1]
    audited = is_state_change(method)
    latency = metrics.rpc_duration.labels(method)
    counted = metrics.rpc_requests_by

    async def handle(stream: Stream[Any, Any]) -> None:
        gate.enter()
        start = time.perf_counter()
        waited = calltime.start()
        current_stream.set(stream)
        structlog.contextvars.clear_contextvars()
        code = Status.OK
        message = ""
        caller = None
        peer = stream.peer.addr() if stream.peer else None
        try:
            if auth is not None:
                caller = await auth.authenticate(
                    stream.metadata.items() if stream.metadata else (),
                    peer,
                    stream.peer.cert() if auth.needs_cert and stream.peer else None,
                )
                current_caller.set(caller)
                bind_principal(caller.principal)
            else:
                current_caller.set(PUBLIC)
            if role is not None:
                require_role(role)
            await func(stream)
        except asyncio.CancelledError:
            code = Status.CANCELLED  # the caller went away, or shutdown cut the call
            raise
        except Exception as err:
            mapped = to_grpc_error(err)
            if mapped is None:
                code = Status.INTERNAL
                log.exception("rpc failed", method=method)
                raise GRPCError(Status.INTERNAL, "internal error") from err
            code, message = mapped.status, mapped.message or ""
            if mapped is not err:
                raise mapped from None
            raise
        finally:
            gate.leave()
            elapsed = time.perf_counter() - start
            counted(method, code.name).inc()
            latency.observe(max(elapsed - waited[0], 0.0))  # the call's own latency
            if waited[0] > 0:
                metrics.lease_wait.observe(waited[0])
            log.info(
                "rpc",
                method=method,
                code=code.name,
                duration_ms=round(elapsed * 1000, 3),
                peer=peer_text(peer),
                **({"error": message} if message else {}),
            )
            if code in (Status.PERMISSION_DENIED, Status.UNAUTHENTICATED):
                who = caller.principal.name if caller is not None else "unknown"
                metrics.owner_refusals.labels(metrics.owner_label(who), code.name.lower()).inc()
            if audited:
                # principal, service_tag, pool, instance come from the call's context.
                audit_log.info(
                    "audit",
                    action=method,
                    outcome="ok" if code is Status.OK else code.name,
                    **({"error": message} if message else {}),
                    **({"principal": "unknown"} if caller is None else {}),
                )

    return handle
