"""Build the KubeVirt VirtualMachine for an instance from its pool's template. No I/O."""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

import yaml

from vmpool.config.schema import Config, PoolConfig
from vmpool.providers import errors

API_GROUP = "kubevirt.io"
API_VERSION = "v1"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "vmpool"
DEPLOYMENT_LABEL = "vmpool.dev/deployment"
POOL_LABEL = "vmpool.dev/pool"
INSTANCE_LABEL = "vmpool.dev/instance"
#: The pool's real name, verbatim, when the pool label holds a stand-in: pool
#: names (letters of any script, up to 128 characters) are wider than label values.
POOL_ANNOTATION = "vmpool.dev/pool-name"

#: What ``vmpool render`` prints as metadata.name: clearly not a real instance.
PREVIEW_NAME = "vmp-xxxx-preview"

_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
# Metadata the API server owns; a template copied from `kubectl get -o yaml` carries it.
_SERVER_METADATA = (
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "ownerReferences",
    "finalizers",
)


def check_label_value(value: str, what: str) -> str:
    if not _LABEL_VALUE.match(value):
        raise ValueError(f"{what}: {value!r} is not a valid Kubernetes label value")
    return value


def label_selector(deployment: str) -> str:
    """The selector of every object this deployment owns."""
    return f"{MANAGED_BY_LABEL}={MANAGED_BY},{DEPLOYMENT_LABEL}={deployment}"


def pool_label_value(pool: str) -> str:
    """A valid label value for ``pool``: the name itself when it is one, else
    its ASCII letters, digits, '-', '_', '.' (cut) and a hash of the whole name,
    so two pool names never share a value."""
    if _LABEL_VALUE.match(pool) and pool.isascii():
        return pool
    digest = hashlib.sha256(pool.encode()).hexdigest()[:10]
    kept = re.sub(r"[^A-Za-z0-9_.-]+", "-", pool.encode("ascii", "ignore").decode())
    kept = re.sub(r"^[^A-Za-z0-9]+", "", kept)[:52].rstrip("-_.")
    return f"{kept}-{digest}" if kept else f"p-{digest}"


def our_labels(*, deployment: str, pool: str, name: str) -> dict[str, str]:
    return {
        MANAGED_BY_LABEL: MANAGED_BY,
        DEPLOYMENT_LABEL: deployment,
        POOL_LABEL: pool_label_value(pool),
        INSTANCE_LABEL: name,
    }


def is_ours(obj: dict[str, Any], *, deployment: str, name: str) -> bool:
    """Whether ``obj`` is the VM this deployment made for instance ``name``."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(DEPLOYMENT_LABEL) == deployment and labels.get(INSTANCE_LABEL) == name)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.Invalid(f"{where}: must be a mapping")
    return value


def _string_map(value: Any, where: str) -> dict[str, str]:
    out = _mapping(value, where)
    return {str(k): "" if v is None else str(v) for k, v in out.items()}


def render_vm(pool: PoolConfig, name: str, *, namespace: str, deployment: str) -> dict[str, Any]:
    """The VirtualMachine object for instance ``name`` of ``pool``.

    The template's labels and annotations are kept; ours are added to the VM
    and to spec.template.metadata.labels (so the VMI and its pod carry them).
    The VM always runs: spec.runStrategy is Always and spec.running is dropped.
    Raises ``errors.Invalid`` naming the template key at fault.
    """
    where = f"pools[{pool.name}].template"
    vm = copy.deepcopy(pool.template)
    vm.setdefault("apiVersion", f"{API_GROUP}/{API_VERSION}")
    vm.setdefault("kind", "VirtualMachine")
    if vm["apiVersion"] != f"{API_GROUP}/{API_VERSION}":
        raise errors.Invalid(f"{where}.apiVersion: must be {API_GROUP}/{API_VERSION}")
    if vm["kind"] != "VirtualMachine":
        raise errors.Invalid(f"{where}.kind: must be VirtualMachine")
    vm.pop("status", None)

    ours = our_labels(deployment=deployment, pool=pool.name, name=name)
    meta = _mapping(vm.get("metadata"), f"{where}.metadata")
    for key in _SERVER_METADATA:
        meta.pop(key, None)
    labels = _string_map(meta.get("labels"), f"{where}.metadata.labels")
    labels.update(ours)
    meta["labels"] = labels
    annotations = _string_map(meta.get("annotations"), f"{where}.metadata.annotations")
    if ours[POOL_LABEL] != pool.name:  # the label holds a stand-in: keep the real name
        annotations[POOL_ANNOTATION] = pool.name
    if annotations:
        meta["annotations"] = annotations
    meta["name"] = name
    meta["namespace"] = namespace
    vm["metadata"] = meta

    spec = _mapping(vm.get("spec"), f"{where}.spec")
    spec.pop("running", None)
    spec["runStrategy"] = "Always"
    vmi = _mapping(spec.get("template"), f"{where}.spec.template")
    vmi_meta = _mapping(vmi.get("metadata"), f"{where}.spec.template.metadata")
    vmi_labels = _string_map(vmi_meta.get("labels"), f"{where}.spec.template.metadata.labels")
    vmi_labels.update(ours)
    vmi_meta["labels"] = vmi_labels
    vmi["metadata"] = vmi_meta
    spec["template"] = vmi
    vm["spec"] = spec
    return vm


def render_pool_preview(config: Config, pool_name: str) -> str:
    """The YAML of the VM a pool would create, with a placeholder name (`vmpool render`)."""
    pool = config.pool(pool_name)
    if pool is None:
        raise ValueError(f"pool: no pool named {pool_name!r}")
    return render_preview(config, pool)


def render_preview(config: Config, pool: PoolConfig) -> str:
    """The YAML of the VM ``pool`` (a config pool, or an API pool's) would create."""
    kv = config.provider.kubevirt
    vm = render_vm(pool, PREVIEW_NAME, namespace=kv.namespace, deployment=kv.deployment)
    return yaml.safe_dump(vm, sort_keys=False, default_flow_style=False)
