"""The KubeVirt provider: instances are VirtualMachine objects in one namespace.

State comes from watches (VMs and VMIs carrying this deployment's labels),
never from polling; writes are single idempotent calls by VM name. See
docs/kubevirt.md for the template format, RBAC, and how readiness, failure
and zone are decided.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from vmpool.config.schema import KubevirtProviderConfig, PoolConfig
from vmpool.core.backoff import Retry
from vmpool.core.echo import echo
from vmpool.ops.metrics import Metrics
from vmpool.providers import errors
from vmpool.providers.base import VMPhase, VMStatus
from vmpool.providers.kubevirt_client import (
    MAX_REMOTE_TEXT,
    ApiCaller,
    load_client_configuration,
)
from vmpool.providers.kubevirt_manifest import (
    API_GROUP,
    API_VERSION,
    POOL_ANNOTATION,
    POOL_LABEL,
    check_label_value,
    is_ours,
    label_selector,
    render_pool_preview,
    render_vm,
)
from vmpool.providers.kubevirt_watch import Informer

__all__ = [
    "FAILURE_STATES",
    "KubevirtProvider",
    "build_kubevirt_provider",
    "render_pool_preview",
    "render_vm",
]

log = structlog.get_logger(__name__)

VMS = "virtualmachines"
VMIS = "virtualmachineinstances"
ZONE_LABEL = "topology.kubernetes.io/zone"

#: printableStatus values that mean "will not boot by itself" once they last
#: longer than the failure grace (a pull can fail once and then succeed).
FAILURE_STATES = frozenset(
    {
        "ErrorUnschedulable",
        "ErrImagePull",
        "ImagePullBackOff",
        "CrashLoopBackOff",
        "ErrorPvcNotFound",
        "DataVolumeError",
    }
)
STOPPED = "Stopped"

#: After a failed Node GET, ask again no sooner than this.
NODE_RETRY_SECONDS = 30.0


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _status(obj: Mapping[str, Any]) -> dict[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, dict) else {}


def _condition_message(status: Mapping[str, Any]) -> str:
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("message"):
            return echo(str(cond["message"]), MAX_REMOTE_TEXT)
    return ""


class KubevirtProvider:
    """Implements ``vmpool.providers.base.Provider`` on KubeVirt."""

    def __init__(
        self,
        config: KubevirtProviderConfig,
        pools: Iterable[PoolConfig] = (),
        *,
        metrics: Metrics | None = None,
        failure_grace: float = 30.0,
        resync_interval: float = 300.0,
        watch_timeout: float = 290.0,
        backoff_base: float = 0.2,
        backoff_cap: float = 30.0,
        max_wait: float = 10.0,
        attempts: int = 4,
        request_timeout: float = 30.0,
        client_configuration: client.Configuration | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_label_value(config.deployment, "provider.kubevirt.deployment")
        self.orphan_grace: timedelta = config.orphan_grace
        self.namespace = config.namespace
        self.deployment = config.deployment
        self._config = config
        self._pools: dict[str, PoolConfig] = {p.name: p for p in pools}
        self._failure_grace = failure_grace
        self._resync_interval = resync_interval
        self._watch_timeout = watch_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._request_timeout = request_timeout
        self._client_configuration = client_configuration
        self._clock = clock
        self.caller = ApiCaller(
            qps=config.qps,
            burst=config.burst,
            metrics=metrics,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            max_wait=max_wait,
            attempts=attempts,
            clock=clock,
        )
        self._on_change: Callable[[], None] = lambda: None
        self._api_client: client.ApiClient | None = None
        self._custom: client.CustomObjectsApi | None = None
        self._core: client.CoreV1Api | None = None
        self.vms: Informer | None = None
        self.vmis: Informer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._broken: dict[str, BaseException] = {}  # watch -> why it is down
        self._restarts: dict[str, Retry] = {}
        # Failure bookkeeping, by VM name.
        self._bad_since: dict[str, float] = {}
        self._grace_timers: dict[str, asyncio.TimerHandle] = {}
        self._was_ready: set[str] = set()
        # Zones of nodes; "" when the node has none or is gone.
        self._node_zones: dict[str, str] = {}
        self._node_retry_at: dict[str, float] = {}
        self._node_fetching: set[str] = set()
        self._nodes_forbidden = False

    # -- lifecycle ---------------------------------------------------------

    async def start(self, on_change: Callable[[], None]) -> None:
        if self._api_client is not None:
            raise RuntimeError("KubevirtProvider.start called twice")
        self._on_change = on_change
        configuration = self._client_configuration or await load_client_configuration(
            self._config.kubeconfig
        )
        self._api_client = client.ApiClient(configuration)
        self._custom = client.CustomObjectsApi(self._api_client)
        self._core = client.CoreV1Api(self._api_client)
        common: dict[str, Any] = {
            "group": API_GROUP,
            "version": API_VERSION,
            "namespace": self.namespace,
            "label_selector": label_selector(self.deployment),
            "on_change": self._changed,
            "resync_interval": self._resync_interval,
            "watch_timeout": self._watch_timeout,
            "backoff_base": self._backoff_base,
            "backoff_cap": self._backoff_cap,
            "request_timeout": self._request_timeout,
            "clock": self._clock,
        }
        self.vms = Informer(self._custom, self.caller, plural=VMS, **common)
        self.vmis = Informer(self._custom, self.caller, plural=VMIS, **common)
        for informer in (self.vms, self.vmis):
            self._supervise(informer)
        log.info(
            "kubevirt_provider_started",
            host=configuration.host,
            namespace=self.namespace,
            deployment=self.deployment,
        )

    async def close(self) -> None:
        for timer in self._grace_timers.values():
            timer.cancel()
        self._grace_timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    def _supervise(self, informer: Informer) -> None:
        """Run ``informer`` and restart it, with backoff, if it crashes (a bug
        or an error it does not expect): while it is down, ``observe`` raises,
        so passes fail loudly instead of acting on a stale view; once it runs
        again (relisting first), passes go on."""
        retry = self._restarts.setdefault(informer.what, Retry(self._backoff_base, 60.0))

        async def run() -> None:
            informer.resource_version = None  # start from a fresh list
            self._broken.pop(informer.what, None)
            await informer.run()

        async def restart(delay: float) -> None:
            await asyncio.sleep(delay)
            self._supervise(informer)

        def crashed(exc: BaseException) -> None:
            self._broken[informer.what] = exc
            delay = retry.next_delay()
            log.warning("kubevirt_watch_restarting", what=informer.what, retry_in_s=round(delay, 2))
            self._spawn(restart(delay), name=f"kubevirt-restart-{informer.what}")
            self._on_change()

        self._spawn(run(), name=f"kubevirt-watch-{informer.what}", on_crash=crashed)

    def _spawn(
        self,
        coro: Any,
        *,
        name: str,
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                log.error("kubevirt_task_crashed", task=name, error=repr(exc), exc_info=exc)
                if on_crash is not None:
                    on_crash(exc)

        task.add_done_callback(done)

    # -- writes ------------------------------------------------------------

    def _apis(self) -> tuple[client.CustomObjectsApi, client.CoreV1Api]:
        if self._custom is None or self._core is None:
            raise errors.Unavailable("the KubeVirt provider is not started")
        return self._custom, self._core

    async def create(self, name: str, pool: PoolConfig) -> None:
        custom, _ = self._apis()
        self._pools[pool.name] = pool
        body = render_vm(pool, name, namespace=self.namespace, deployment=self.deployment)
        what = f"VirtualMachine {self.namespace}/{name}"
        try:
            await self.caller.call(
                "create",
                what,
                lambda: custom.create_namespaced_custom_object(
                    API_GROUP,
                    API_VERSION,
                    self.namespace,
                    VMS,
                    body,
                    _request_timeout=self._request_timeout,
                ),
                expected=(errors.Conflict,),
            )
        except errors.Conflict:
            # Most likely our own earlier create whose answer was lost.
            existing = await self._get(name)
            if existing is None:
                raise errors.Conflict(f"{what}: exists but vanished while checking it") from None
            if not is_ours(existing, deployment=self.deployment, name=name):
                raise errors.Conflict(
                    f"{what}: already exists and does not carry deployment "
                    f"{self.deployment!r} and instance {name!r} labels"
                ) from None
        log.info("kubevirt_vm_created", vm=name, pool=pool.name)

    async def delete(self, name: str) -> None:
        custom, _ = self._apis()
        what = f"VirtualMachine {self.namespace}/{name}"
        cached = self.vms.objects.get(name) if self.vms is not None else None
        if cached is not None and _meta(cached).get("deletionTimestamp"):
            # Already being deleted: only find out whether it is gone yet.
            if await self._get(name) is None and self.vms is not None:
                self.vms.forget(name)
            return
        try:
            await self.caller.call(
                "delete",
                what,
                lambda: custom.delete_namespaced_custom_object(
                    API_GROUP,
                    API_VERSION,
                    self.namespace,
                    VMS,
                    name,
                    propagation_policy="Foreground",
                    _request_timeout=self._request_timeout,
                ),
                expected=(errors.NotFound,),
            )
        except errors.NotFound:
            if cached is not None and await self._get(name) is None and self.vms is not None:
                self.vms.forget(name)  # our view was stale: confirmed gone
            return
        log.info("kubevirt_vm_delete_requested", vm=name)

    async def _get(self, name: str) -> dict[str, Any] | None:
        custom, _ = self._apis()
        try:
            obj: Any = await self.caller.call(
                "get",
                f"VirtualMachine {self.namespace}/{name}",
                lambda: custom.get_namespaced_custom_object(
                    API_GROUP,
                    API_VERSION,
                    self.namespace,
                    VMS,
                    name,
                    _request_timeout=self._request_timeout,
                ),
                expected=(errors.NotFound,),
            )
        except errors.NotFound:
            return None
        return obj if isinstance(obj, dict) else None

    # -- state ---------------------------------------------------------------

    def _changed(self) -> None:
        """An informer's view changed: update failure clocks, tell the reconciler."""
        vms = self.vms.objects if self.vms is not None else {}
        now = self._clock()
        loop = asyncio.get_running_loop()
        for name, vm in vms.items():
            status = _status(vm)
            printable = str(status.get("printableStatus") or "")
            if status.get("ready") is True:
                self._was_ready.add(name)
            if printable in FAILURE_STATES or printable == STOPPED:
                if name not in self._bad_since:
                    self._bad_since[name] = now
                    self._grace_timers[name] = loop.call_later(
                        self._failure_grace + 0.05, self._on_change
                    )
            else:
                self._clear_bad(name)
        for name in [n for n in self._bad_since if n not in vms]:
            self._clear_bad(name)
        self._was_ready.intersection_update(vms)
        self._on_change()

    def _clear_bad(self, name: str) -> None:
        self._bad_since.pop(name, None)
        timer = self._grace_timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    async def observe(self, *, full: bool = False) -> Mapping[str, VMStatus] | None:
        # The watch cache is the fresh view: `full` asks for nothing more.
        if self._broken:
            what, exc = next(iter(self._broken.items()))
            raise errors.ProviderError(f"KubeVirt watch of {what} down (restarting): {exc!r}")
        if self.vms is None or self.vmis is None or not (self.vms.synced and self.vmis.synced):
            return None
        now = self._clock()
        return {name: self._vm_status(name, vm, now) for name, vm in self.vms.objects.items()}

    def _vm_status(self, name: str, vm: dict[str, Any], now: float) -> VMStatus:
        meta = _meta(vm)
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        # The annotation has the real name (the label a safe stand-in).
        pool = str(annotations.get(POOL_ANNOTATION) or labels.get(POOL_LABEL, ""))
        deleting = bool(meta.get("deletionTimestamp"))
        status = _status(vm)
        printable = str(status.get("printableStatus") or "")
        phase = VMPhase.PENDING
        reason = ""
        since = self._bad_since.get(name)
        zone = self._zone(name, pool)
        if status.get("ready") is True:
            # Not ready for us until its node's zone is known: the reconciler
            # records the zone once, when it marks the instance ready.
            phase = VMPhase.READY if zone is not None else VMPhase.PENDING
        elif printable == STOPPED and name in self._was_ready and not deleting:
            phase, reason = VMPhase.FAILED, "stopped unexpectedly after it was ready"
        elif since is not None and now - since >= self._failure_grace:
            phase = VMPhase.FAILED
            reason = f"{printable} for {now - since:.0f}s"
            detail = _condition_message(status)
            if detail:
                reason += f": {detail}"
        return VMStatus(
            name=name,
            pool=pool,
            phase=phase,
            zone=zone or "",
            reason=reason,
            deleting=deleting,
        )

    # -- zones ---------------------------------------------------------------

    def _zone(self, name: str, pool: str) -> str | None:
        """The VM's zone, "" if none or unknown; None while its node is being looked up."""
        config = self._pools.get(pool)
        if config is not None and config.zone:
            return config.zone
        vmi = self.vmis.objects.get(name) if self.vmis is not None else None
        node = str(_status(vmi).get("nodeName") or "") if vmi is not None else ""
        if not node or self._nodes_forbidden:
            return ""
        zone = self._node_zones.get(node)
        if zone is not None:
            return zone
        if node not in self._node_fetching and self._node_retry_at.get(node, 0.0) <= self._clock():
            self._node_fetching.add(node)
            self._spawn(self._fetch_node(node), name=f"kubevirt-node-{node}")
        return None if node in self._node_fetching else ""

    async def _fetch_node(self, node: str) -> None:
        _, core = self._apis()

        async def read() -> Any:
            try:
                return await core.read_node(node, _request_timeout=self._request_timeout)
            except ApiException as exc:
                if exc.status == 403:
                    return None  # no RBAC for nodes: zones are simply unknown
                raise

        try:
            result = await self.caller.call(
                "get_node", f"Node {node}", read, expected=(errors.NotFound,)
            )
        except errors.NotFound:
            self._node_zones[node] = ""
            return
        except errors.ProviderError as err:
            self._node_retry_at[node] = self._clock() + NODE_RETRY_SECONDS
            log.warning("kubevirt_node_lookup_failed", node=node, error=str(err))
            return
        finally:
            self._node_fetching.discard(node)
            # VMs on this node were held back until the answer (see _vm_status).
            # on_change only schedules a pass: the zone below is recorded first.
            self._on_change()
        if result is None:
            if not self._nodes_forbidden:
                log.info("kubevirt_nodes_forbidden", detail="zones come only from pool config")
            self._nodes_forbidden = True
            return
        labels = (result.metadata.labels if result.metadata is not None else None) or {}
        zone = str(labels.get(ZONE_LABEL, ""))
        self._node_zones[node] = zone


def build_kubevirt_provider(
    config: KubevirtProviderConfig,
    pools: Iterable[PoolConfig],
    metrics: Metrics | None = None,
) -> KubevirtProvider:
    """What the composition root calls for ``provider.kind: kubevirt``."""
    return KubevirtProvider(config, pools, metrics=metrics)
