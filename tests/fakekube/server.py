"""A fake Kubernetes API server with a simulated KubeVirt controller.

Faithful to the REST contract the provider relies on: every write bumps a
global resourceVersion; list and watch (JSON lines, BOOKMARK events when
asked) take label selectors; errors are ``kind: Status`` objects with
code/reason/message; deletion sets deletionTimestamp and removes the object
a moment later; a watch from a compacted resourceVersion gets 410 Gone.
Every VirtualMachine create is validated against KubeVirt's OpenAPI schema.

Fault injection: failing writes, 429 with Retry-After, dropped watches,
expired resourceVersions, forbidden nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.fakekube.schema import vm_errors
from tests.fakekube.selectors import parse_selector

KUBEVIRT = "kubevirt.io/v1"
VMS = "virtualmachines"
VMIS = "virtualmachineinstances"
NODES = "nodes"
KINDS = {VMS: "VirtualMachine", VMIS: "VirtualMachineInstance", NODES: "Node"}
ZONE_LABEL = "topology.kubernetes.io/zone"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        obj["details"] = details
    return obj


def status_response(
    code: int, reason: str, message: str, *, headers: dict[str, str] | None = None, **details: Any
) -> web.Response:
    return web.json_response(
        status_object(code, reason, message, **details), status=code, headers=headers
    )


@dataclasses.dataclass
class Request:
    """One request as the server saw it (for rate and retry assertions)."""

    at: float
    method: str
    path: str
    query: dict[str, str]
    status: int

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch", "").lower() in ("true", "1")

    @property
    def is_write(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH", "DELETE")


@dataclasses.dataclass
class _Event:
    rv: int
    resource: str
    namespace: str
    type: str
    obj: dict[str, Any]


class _Watcher:
    def __init__(self, resource: str, namespace: str, matcher: Callable[[Any], bool]) -> None:
        self.resource = resource
        self.namespace = namespace
        self.matcher = matcher
        self.queue: asyncio.Queue[_Event | str] = asyncio.Queue()

    def wants(self, ev: _Event) -> bool:
        labels = (ev.obj.get("metadata") or {}).get("labels") or {}
        return (
            ev.resource == self.resource
            and ev.namespace == self.namespace
            and bool(self.matcher(labels))
        )


@dataclasses.dataclass
class Faults:
    write_failure_rate: float = 0.0
    write_failure_until: float = 0.0
    #: Share of injected write failures applied before the 500 (a lost answer).
    write_failure_after_apply: float = 0.5
    throttle_until: float = 0.0
    throttle_requests: int = 0
    throttle_retry_after: int = 1
    refuse_watches_until: float = 0.0
    nodes_forbidden: bool = False


@dataclasses.dataclass
class ServiceAccountToken:
    """A token the fake's TokenReview accepts (authentication.k8s.io/v1)."""

    username: str
    groups: list[str]
    audiences: list[str]
    expires: float = float("inf")  # unix time
    uid: str = ""


class FakeKube:
    """The fake API server. ``await start()``, then point a kubeconfig at ``url``."""

    def __init__(
        self,
        *,
        token: str = "fake-token",
        boot_step: float = 0.1,
        delete_delay: float = 0.3,
        bookmark_interval: float = 0.5,
        broken_image_marker: str = "broken",
        seed: int = 0,
    ) -> None:
        self.token = token
        self.boot_step = boot_step
        self.delete_delay = delete_delay
        self.bookmark_interval = bookmark_interval
        self.broken_image_marker = broken_image_marker
        self.faults = Faults()
        self.requests: list[Request] = []
        #: Every VirtualMachine body accepted by a create, in order.
        self.created: list[dict[str, Any]] = []
        #: printableStatus to get stuck in, by VM name (e.g. "ErrorUnschedulable").
        self.fail_vms: dict[str, str] = {}
        self._rng = random.Random(seed)
        self._rv = 1000
        self._compacted = 0
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._events: list[_Event] = []
        self._watchers: set[_Watcher] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._node_cycle: itertools.cycle[str] | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""
        #: Tokens TokenReview accepts; without system:auth-delegator it answers 403.
        self.service_tokens: dict[str, ServiceAccountToken] = {}
        self.token_reviews_forbidden = False
        self.token_reviews = 0

    # -- lifecycle ------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware])
        base = "/apis/kubevirt.io/v1/namespaces/{namespace}/{plural}"
        app.router.add_get(base, self._list_or_watch)
        app.router.add_post(base, self._create)
        app.router.add_get(base + "/{name}", self._get)
        app.router.add_delete(base + "/{name}", self._delete)
        app.router.add_get("/api/v1/nodes", self._list_nodes)
        app.router.add_get("/api/v1/nodes/{name}", self._get_node)
        app.router.add_get("/version", self._version)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.url = f"http://{bound[0]}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        self.drop_watches()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    # -- test controls ----------------------------------------------------------

    def add_node(self, name: str, zone: str = "") -> None:
        labels = {"kubernetes.io/hostname": name}
        if zone:
            labels[ZONE_LABEL] = zone
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
        self._put(NODES, "", node, "ADDED")
        names = sorted(n for (r, _, n) in self._objects if r == NODES)
        self._node_cycle = itertools.cycle(names)

    def fail_writes(self, rate: float, seconds: float, *, after_apply: float = 0.5) -> None:
        """For ``seconds``, answer ``rate`` of POST/DELETE with 500; ``after_apply`` of
        those are carried out first (the client never hears the answer)."""
        self.faults.write_failure_rate = rate
        self.faults.write_failure_until = time.monotonic() + seconds
        self.faults.write_failure_after_apply = after_apply

    def throttle(self, *, requests: int = 0, seconds: float = 0.0, retry_after: int = 1) -> None:
        """Answer the next ``requests`` requests (or all for ``seconds``) with 429."""
        self.faults.throttle_requests = requests
        self.faults.throttle_until = time.monotonic() + seconds if seconds else 0.0
        self.faults.throttle_retry_after = retry_after

    def drop_watches(self, *, refuse_for: float = 0.0) -> None:
        """Cut every open watch connection; refuse new ones for ``refuse_for`` seconds."""
        if refuse_for:
            self.faults.refuse_watches_until = time.monotonic() + refuse_for
        for w in list(self._watchers):
            w.queue.put_nowait("drop")

    def expire_resource_versions(
        self, *, notify_watches: bool = False, end_watches: bool = False
    ) -> None:
        """Compact history: watches from any earlier resourceVersion get 410 Gone.

        With ``notify_watches``, open watches get an ERROR 410 event and end.
        With ``end_watches``, other writes in the cluster move the resourceVersion
        on first, and open watches end normally (as at their timeout), so their
        clients resume from a resourceVersion that is now too old.
        """
        if end_watches:
            self._rv += 10  # writes to objects nobody here watches
        self._compacted = self._rv
        self._events.clear()
        for w in list(self._watchers):
            if notify_watches:
                w.queue.put_nowait("expired")
            elif end_watches:
                w.queue.put_nowait("end")

    def objects(self, resource: str = VMS, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(obj)
            for (r, ns, _), obj in sorted(self._objects.items())
            if r == resource and (namespace is None or ns == namespace)
        ]

    def get_object(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self._objects.get((resource, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def delete_now(self, namespace: str, name: str) -> None:
        """Someone else deletes VM ``name`` (behind the provider's back)."""
        self._start_deletion(namespace, name)

    def stop_vm(self, namespace: str, name: str) -> None:
        """The guest shut down: the VMI is gone and the VM reports Stopped."""
        self._remove(VMIS, namespace, name)
        self._set_vm_status(namespace, name, printableStatus="Stopped", ready=False)

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def reset_requests(self) -> None:
        self.requests.clear()

    # -- store ----------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _put(self, resource: str, namespace: str, obj: dict[str, Any], kind: str) -> None:
        rv = self._next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        self._objects[(resource, namespace, obj["metadata"]["name"])] = obj
        self._emit(_Event(rv, resource, namespace, kind, copy.deepcopy(obj)))

    def _remove(self, resource: str, namespace: str, name: str) -> None:
        obj = self._objects.pop((resource, namespace, name), None)
        if obj is None:
            return
        rv = self._next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        self._emit(_Event(rv, resource, namespace, "DELETED", copy.deepcopy(obj)))

    def _emit(self, ev: _Event) -> None:
        self._events.append(ev)
        if len(self._events) > 5000:
            del self._events[:-5000]
            self._compacted = self._events[0].rv - 1
        for w in list(self._watchers):
            if w.wants(ev):
                w.queue.put_nowait(ev)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- middleware: auth, faults, request log -----------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        record = Request(time.monotonic(), request.method, request.path, dict(request.query), 0)
        self.requests.append(record)
        response = await self._handle(request, handler, record)
        record.status = response.status
        return response

    async def _handle(
        self, request: web.Request, handler: Handler, record: Request
    ) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return status_response(401, "Unauthorized", "Unauthorized")
        f = self.faults
        now = time.monotonic()
        if f.throttle_requests > 0 or now < f.throttle_until:
            f.throttle_requests = max(0, f.throttle_requests - 1)
            return status_response(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
                headers={"Retry-After": str(f.throttle_retry_after)},
                retryAfterSeconds=f.throttle_retry_after,
            )
        failing = record.is_write and now < f.write_failure_until
        if failing and self._rng.random() < f.write_failure_rate:
            if self._rng.random() < f.write_failure_after_apply:
                await handler(request)  # carried out; the answer is lost
            return status_response(
                500, "InternalError", "Internal error occurred: injected fault (etcd timeout)"
            )
        return await handler(request)

    # -- handlers -------------------------------------------------------------------

    async def _token_review(self, request: web.Request) -> web.Response:
        """TokenReview as the API server answers it: 201 with the spec echoed and
        status.authenticated/user/audiences, or status.error for a bad token."""
        if self.token_reviews_forbidden:
            return status_response(
                403,
                "Forbidden",
                'tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:'
                'vmpool:vmpool" cannot create resource "tokenreviews" in API group '
                '"authentication.k8s.io" at the cluster scope',
            )
        try:
            body = await request.json()
        except ValueError:
            return status_response(400, "BadRequest", "the body of the request was not JSON")
        if (
            not isinstance(body, dict)
            or body.get("apiVersion") != "authentication.k8s.io/v1"
            or body.get("kind") != "TokenReview"
            or not isinstance(body.get("spec"), dict)
        ):
            return status_response(400, "BadRequest", "not an authentication.k8s.io/v1 TokenReview")
        self.token_reviews += 1
        spec = body["spec"]
        wanted = spec.get("audiences") or []
        known = self.service_tokens.get(spec.get("token") or "")
        status: dict[str, Any] = {"user": {}}
        if known is None or known.expires <= time.time():
            status["error"] = (
                "[invalid bearer token, service account token has expired]"
                if known
                else ("[invalid bearer token, square/go-jose: error in cryptographic primitive]")
            )
        elif wanted and not set(wanted) & set(known.audiences):
            status["error"] = (
                f"[invalid bearer token, token audiences {json.dumps(known.audiences)} is "
                f"invalid for the target audiences {json.dumps(wanted)}]"
            )
        else:
            status = {
                "authenticated": True,
                "user": {
                    "username": known.username,
                    "uid": known.uid or known.username,
                    "groups": known.groups,
                },
                "audiences": [a for a in known.audiences if not wanted or a in wanted],
            }
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(answer, status=201)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake"})

    def _resource(self, request: web.Request) -> str | web.Response:
        plural = request.match_info["plural"]
        if plural not in (VMS, VMIS):
            return status_response(
                404, "NotFound", "the server could not find the requested resource"
            )
        return plural

    async def _list_or_watch(self, request: web.Request) -> web.StreamResponse:
        resource = self._resource(request)
        if isinstance(resource, web.Response):
            return resource
        namespace = request.match_info["namespace"]
        try:
            matcher = parse_selector(request.query.get("labelSelector"))
        except ValueError as err:
            return status_response(400, "BadRequest", f"unable to parse requirement: {err}")
        if request.query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, resource, namespace, matcher)
        items = [
            copy.deepcopy(obj)
            for (r, ns, _), obj in sorted(self._objects.items())
            if r == resource
            and ns == namespace
            and matcher((obj.get("metadata") or {}).get("labels") or {})
        ]
        return web.json_response(
            {
                "apiVersion": KUBEVIRT,
                "kind": KINDS[resource] + "List",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        )

    async def _watch(
        self,
        request: web.Request,
        resource: str,
        namespace: str,
        matcher: Callable[[Any], bool],
    ) -> web.StreamResponse:
        if time.monotonic() < self.faults.refuse_watches_until:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=503)
        bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        rv_text = request.query.get("resourceVersion") or ""
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if rv_text not in ("", "0") and int(rv_text) < self._compacted:
            await send(
                "ERROR",
                status_object(
                    410, "Expired", f"too old resource version: {rv_text} ({self._compacted})"
                ),
            )
            await resp.write_eof()
            return resp
        watcher = _Watcher(resource, namespace, matcher)
        self._watchers.add(watcher)
        # Replay synchronously (no await) so nothing slips between replay and queue.
        backlog: list[_Event] = []
        if rv_text in ("", "0"):
            for (r, ns, _), obj in sorted(self._objects.items()):
                ev = _Event(self._rv, r, ns, "ADDED", copy.deepcopy(obj))
                if watcher.wants(ev):
                    backlog.append(ev)
            last = self._rv
        else:
            last = int(rv_text)
            backlog = [ev for ev in self._events if ev.rv > last and watcher.wants(ev)]
            last = self._rv
        try:
            for ev in backlog:
                await send(ev.type, ev.obj)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(
                        watcher.queue.get(), min(remaining, self.bookmark_interval)
                    )
                except TimeoutError:
                    if bookmarks:
                        await send(
                            "BOOKMARK",
                            {
                                "apiVersion": KUBEVIRT,
                                "kind": KINDS[resource],
                                "metadata": {"resourceVersion": str(self._rv)},
                            },
                        )
                    continue
                if item == "drop":
                    if request.transport is not None:
                        request.transport.abort()  # mid-stream: no final chunk
                    return resp
                if item == "end":
                    break
                if item == "expired":
                    await send("ERROR", status_object(410, "Expired", "too old resource version"))
                    break
                assert isinstance(item, _Event)
                if item.rv <= last:
                    continue
                await send(item.type, item.obj)
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            self._watchers.discard(watcher)
        return resp

    async def _get(self, request: web.Request) -> web.Response:
        resource = self._resource(request)
        if isinstance(resource, web.Response):
            return resource
        ns, name = request.match_info["namespace"], request.match_info["name"]
        obj = self._objects.get((resource, ns, name))
        if obj is None:
            return self._not_found(resource, name)
        return web.json_response(obj)

    def _not_found(self, resource: str, name: str) -> web.Response:
        group = "" if resource == NODES else "kubevirt.io"
        what = resource if resource == NODES else f"{resource}.kubevirt.io"
        return status_response(
            404, "NotFound", f'{what} "{name}" not found', name=name, group=group, kind=resource
        )

    async def _create(self, request: web.Request) -> web.Response:
        resource = self._resource(request)
        if isinstance(resource, web.Response):
            return resource
        namespace = request.match_info["namespace"]
        if resource != VMS:
            return status_response(405, "MethodNotAllowed", f"create of {resource} not supported")
        try:
            body = await request.json()
        except ValueError:
            return status_response(400, "BadRequest", "the body is not JSON")
        if not isinstance(body, dict):
            return status_response(400, "BadRequest", "the body is not an object")
        if body.get("apiVersion") != KUBEVIRT or body.get("kind") != "VirtualMachine":
            return status_response(
                400,
                "BadRequest",
                f"the API version in the data ({body.get('apiVersion')}) and kind "
                f"({body.get('kind')}) do not match {KUBEVIRT} VirtualMachine",
            )
        raw_meta = body.get("metadata")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        name = str(meta.get("name") or "")
        problems = vm_errors(body)
        if not name or not DNS_SUBDOMAIN.match(name):
            problems.append(f"metadata.name: Invalid value: {name!r}: must be a DNS-1123 name")
        if meta.get("namespace") not in (None, namespace):
            return status_response(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        raw_spec = body.get("spec")
        spec: dict[str, Any] = raw_spec if isinstance(raw_spec, dict) else {}
        if "running" in spec and "runStrategy" in spec:
            problems.append("spec.running: Invalid value: running and runStrategy are exclusive")
        if problems:
            return status_response(
                422,
                "Invalid",
                f'VirtualMachine.kubevirt.io "{name}" is invalid: ' + "; ".join(problems),
                name=name,
                group="kubevirt.io",
                kind="VirtualMachine",
                causes=[{"message": p} for p in problems],
            )
        if (VMS, namespace, name) in self._objects:
            return status_response(
                409,
                "AlreadyExists",
                f'virtualmachines.kubevirt.io "{name}" already exists',
                name=name,
                group="kubevirt.io",
                kind="virtualmachines",
            )
        self.created.append(copy.deepcopy(body))
        obj = copy.deepcopy(body)
        obj["metadata"] = {
            **meta,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "generation": 1,
            "creationTimestamp": _now_rfc3339(),
            "finalizers": ["kubevirt.io/virtualMachineControllerFinalize"],
        }
        obj["status"] = {}
        self._put(VMS, namespace, obj, "ADDED")
        self._spawn(self._run_vm(namespace, name))
        return web.json_response(obj, status=201)

    async def _delete(self, request: web.Request) -> web.Response:
        resource = self._resource(request)
        if isinstance(resource, web.Response):
            return resource
        ns, name = request.match_info["namespace"], request.match_info["name"]
        if (resource, ns, name) not in self._objects:
            return self._not_found(resource, name)
        if resource == VMS:
            self._start_deletion(ns, name)
        else:
            self._remove(resource, ns, name)
            return web.json_response(status_object(200, "", "deleted") | {"status": "Success"})
        obj = self._objects.get((resource, ns, name))
        return web.json_response(obj)

    async def _list_nodes(self, request: web.Request) -> web.Response:
        if self.faults.nodes_forbidden:
            return self._forbidden("nodes", "")
        return web.json_response(
            {
                "apiVersion": "v1",
                "kind": "NodeList",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": self.objects(NODES),
            }
        )

    async def _get_node(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.faults.nodes_forbidden:
            return self._forbidden("nodes", name)
        obj = self._objects.get((NODES, "", name))
        if obj is None:
            return self._not_found(NODES, name)
        return web.json_response(obj)

    def _forbidden(self, resource: str, name: str) -> web.Response:
        return status_response(
            403,
            "Forbidden",
            f'{resource} "{name}" is forbidden: User "system:serviceaccount:vmpool:vmpool" '
            f'cannot get resource "{resource}" in API group "" at the cluster scope',
            name=name,
            kind=resource,
        )

    # -- the simulated KubeVirt controller -------------------------------------------

    def _vm(self, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self._objects.get((VMS, namespace, name))
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        return obj

    def _set_vm_status(self, namespace: str, name: str, **status: Any) -> bool:
        obj = self._objects.get((VMS, namespace, name))
        if obj is None:
            return False
        obj = copy.deepcopy(obj)
        obj["status"] = {**obj.get("status", {}), **status}
        self._put(VMS, namespace, obj, "MODIFIED")
        return True

    def _failure_for(self, vm: dict[str, Any]) -> str:
        name = vm["metadata"]["name"]
        if name in self.fail_vms:
            return self.fail_vms[name]
        spec = vm.get("spec", {}).get("template", {}).get("spec", {})
        for volume in spec.get("volumes") or []:
            image = (volume.get("containerDisk") or {}).get("image", "")
            if self.broken_image_marker and self.broken_image_marker in image:
                return "ErrImagePull"
        return ""

    async def _run_vm(self, namespace: str, name: str) -> None:
        step = self.boot_step
        await asyncio.sleep(step)
        vm = self._vm(namespace, name)
        if vm is None:
            return
        self._set_vm_status(
            namespace, name, printableStatus="Provisioning", ready=False, created=False
        )
        failure = self._failure_for(vm)
        if failure:
            await self._fail_vm(namespace, name, failure)
            return
        template = vm["spec"]["template"]
        vmi = {
            "apiVersion": KUBEVIRT,
            "kind": "VirtualMachineInstance",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": KUBEVIRT,
                        "kind": "VirtualMachine",
                        "name": name,
                        "uid": vm["metadata"]["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "creationTimestamp": _now_rfc3339(),
            },
            "spec": copy.deepcopy(template.get("spec") or {}),
            "status": {"phase": "Pending"},
        }
        self._put(VMIS, namespace, vmi, "ADDED")
        await asyncio.sleep(step)
        if self._vm(namespace, name) is None:
            return
        node = next(self._node_cycle) if self._node_cycle is not None else ""
        self._set_vm_status(namespace, name, printableStatus="Starting", created=True)
        self._set_vmi_status(namespace, name, phase="Scheduled", nodeName=node)
        await asyncio.sleep(step)
        if self._vm(namespace, name) is None:
            return
        self._set_vmi_status(
            namespace, name, phase="Running", interfaces=_vmi_interfaces(template, name)
        )
        self._set_vm_status(
            namespace,
            name,
            printableStatus="Running",
            ready=True,
            conditions=[{"type": "Ready", "status": "True"}],
        )

    def _set_vmi_status(self, namespace: str, name: str, **status: Any) -> None:
        obj = self._objects.get((VMIS, namespace, name))
        if obj is None:
            return
        obj = copy.deepcopy(obj)
        obj["status"] = {**obj.get("status", {}), **status}
        if status.get("nodeName"):
            obj["metadata"].setdefault("labels", {})["kubevirt.io/nodeName"] = status["nodeName"]
        self._put(VMIS, namespace, obj, "MODIFIED")

    async def _fail_vm(self, namespace: str, name: str, failure: str) -> None:
        """Stay in the failure state; image pulls flap between the two pull errors."""
        flap = {"ErrImagePull": "ImagePullBackOff", "ImagePullBackOff": "ErrImagePull"}
        state, shown = failure, ""
        while self._vm(namespace, name) is not None:
            if state == shown:  # a steady failure: nothing changes, no events
                await asyncio.sleep(self.boot_step * 3)
                continue
            shown = state
            self._set_vm_status(
                namespace,
                name,
                printableStatus=state,
                ready=False,
                conditions=[
                    {
                        "type": "Ready",
                        "status": "False",
                        "reason": state,
                        "message": f"simulated {state} for {name}",
                    }
                ],
            )
            state = flap.get(state, state)
            await asyncio.sleep(self.boot_step * 3)

    def _start_deletion(self, namespace: str, name: str) -> None:
        obj = self._objects.get((VMS, namespace, name))
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        obj = copy.deepcopy(obj)
        obj["metadata"]["deletionTimestamp"] = _now_rfc3339()
        obj["metadata"]["deletionGracePeriodSeconds"] = 0
        obj["status"] = {**obj.get("status", {}), "printableStatus": "Terminating", "ready": False}
        self._put(VMS, namespace, obj, "MODIFIED")
        self._spawn(self._finish_deletion(namespace, name))

    async def _finish_deletion(self, namespace: str, name: str) -> None:
        await asyncio.sleep(self.delete_delay)
        self._remove(VMIS, namespace, name)
        self._remove(VMS, namespace, name)


def _vmi_interfaces(template: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """status.interfaces as virt-handler reports them once the guest is up: one per
    interface of the template (KubeVirt adds a "default" pod network when none is
    given), with an address from the VM's name (pod network 10.244.0.0/16)."""
    spec = template.get("spec") or {}
    devices = ((spec.get("domain") or {}).get("devices")) or {}
    names = [i.get("name", "") for i in devices.get("interfaces") or []] or ["default"]
    out = []
    for index, net in enumerate(names):
        digest = hashlib.sha256(f"{name}/{net}".encode()).digest()
        ip = f"10.244.{digest[0]}.{digest[1] % 254 + 1}"
        out.append(
            {
                "name": net,
                "interfaceName": f"eth{index}",
                "ipAddress": ip,
                "ipAddresses": [ip],
                "mac": "02:" + ":".join(f"{b:02x}" for b in digest[2:7]),
                "infoSource": "domain, guest-agent",
                "linkState": "up",
                "queueCount": 1,
                "podInterfaceName": f"pod{digest[7]:02x}" if index else "eth0",
            }
        )
    return out


@contextlib.asynccontextmanager
async def running_fakekube(**kwargs: Any) -> Any:
    fake = FakeKube(**kwargs)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
