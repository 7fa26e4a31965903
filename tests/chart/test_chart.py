"""The Helm chart: rendered with Helm's engine, validated against Kubernetes 1.31.

What an operator would notice: objects the API server rejects, a config file the
server refuses, RBAC that is too wide or too narrow, probes that restart pods
when the database is slow, a database URL that leaks into a ConfigMap.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.chart.crd_schema import load_crd_schema, reach, to_json_schema
from vmpool.config.loading import parse_config
from vmpool.config.schema import (
    AuthConfig,
    Config,
    DatabaseConfig,
    FakeProviderConfig,
    HardwareTemplateConfig,
    JwtAuthConfig,
    KubernetesAuthConfig,
    KubevirtProviderConfig,
    LimitsConfig,
    PolicyEntry,
    PoolConfig,
    ProviderConfig,
    TierConfig,
    VersionsConfig,
    check_database_url,
)
from vmpool.services.readiness import READY

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "deploy" / "helm" / "vmpool"
RELEASE = "vmpool"
NAMESPACE = "vmpool-system"

DATABASE_URL = "postgresql://vmpool:s3cret@db.example.internal:5432/vmpool"


class Rendered:
    """The objects one `helm template` produces, with lookups tests need."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.manifests = manifests
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                continue
            self.objects.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}

    @property
    def deployment(self) -> dict[str, Any]:
        """The server Deployment (not the optional -reconciler one)."""
        servers = [
            d for d in self.all("Deployment") if not d["metadata"]["name"].endswith("-reconciler")
        ]
        assert len(servers) == 1, f"expected one server Deployment, got {len(servers)}"
        return servers[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        return spec

    def pod_labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.deployment["spec"]["template"]["metadata"]["labels"]
        return labels

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert len(containers) == 1
        return containers[0]

    def config_text(self, name: str | None = None) -> str:
        cm = self.one("ConfigMap", name or RELEASE)
        text: str = cm["data"]["config.yaml"]
        return text

    def secret_value(self, name: str, key: str) -> str:
        return base64.b64decode(self.one("Secret", name)["data"][key]).decode()


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: Any) -> Any:
    """render(values) -> Rendered; results are cached for the session."""
    cache: dict[str, Rendered] = {}

    def _render(values: dict[str, Any], *, namespace: str = NAMESPACE) -> Rendered:
        key = yaml.safe_dump([values, namespace], sort_keys=True)
        if key not in cache:
            cache[key] = Rendered(chart.render(values, name=RELEASE, namespace=namespace))
        return cache[key]

    return _render


K8S_VERSION = "1.31"
# Custom resources: kubernetes-validate has no schema for them; their shape is
# checked by the tests below instead.
CUSTOM_API_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/", "postgresql.cnpg.io/")

BASE: dict[str, Any] = {"database": {"url": DATABASE_URL}}

VM_TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"kubevirt.io/vm": "cirros"}},
    "spec": {
        "runStrategy": "Always",
        "template": {
            "spec": {
                "domain": {
                    "devices": {"disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}]},
                    "memory": {"guest": "128Mi"},
                },
                "volumes": [
                    {
                        "name": "containerdisk",
                        "containerDisk": {"image": "quay.io/kubevirt/cirros-container-disk-demo"},
                    }
                ],
            }
        },
    },
}


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge values dicts (later wins), like repeated `-f` files."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def kubevirt(zones: list[str], namespace: str = "vms") -> dict[str, Any]:
    pools = [
        {
            "name": f"pool-{i}",
            "labels": {"os": "cirros", "size": 2},
            "zone": zone,
            "min_ready": 1,
            "max_size": 4,
            "template": VM_TEMPLATE,
        }
        for i, zone in enumerate(zones)
    ]
    return merged(
        BASE,
        {
            "config": {
                "provider": {"kind": "kubevirt", "kubevirt": {"namespace": namespace}},
                "pools": pools,
            }
        },
    )


VARIANTS: dict[str, dict[str, Any]] = {
    "default": BASE,
    "separate-reconciler": merged(BASE, {"reconciler": {"separate": True}}),
    "external-secret": {
        "database": {"existingSecret": "pg-credentials", "existingSecretKey": "dsn"}
    },
    "service-monitor": merged(BASE, {"serviceMonitor": {"enabled": True}}),
    "network-policy": merged(
        BASE,
        {
            "networkPolicy": {
                "grpcFrom": [{"namespaceSelector": {"matchLabels": {"team": "robots"}}}],
            }
        },
    ),
    "network-policy-any-source": merged(BASE, {"networkPolicy": {"allowAnySource": True}}),
    "tls-cert-manager": merged(
        BASE,
        {"tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}},
    ),
    "tls-mtls": merged(
        BASE,
        {
            "tls": {
                "enabled": True,
                "existingSecret": "vmpool-serving",
                "clientCA": True,
                "requireClientCert": True,
            },
            "config": {
                "auth": {
                    "mode": "mtls",
                    "policy": [{"subject": "spiffe://cluster/ns/ops/*", "roles": ["admin"]}],
                }
            },
        },
    ),
    "auth-kubernetes": merged(
        BASE,
        {
            "tls": {"enabled": True, "existingSecret": "vmpool-serving"},
            "config": {
                "auth": {
                    "mode": "kubernetes",
                    "policy": [
                        {
                            "subject": "system:serviceaccount:team-a:*",
                            "roles": ["lease"],
                            "service_tags": ["ci-*", ""],
                            "max_queued_reservations": 20,
                        },
                        {"subject": "group:vmpool-admins", "roles": ["admin"]},
                    ],
                },
                "limits": {"max_active_leases": 50},
                "admin_listen": "127.0.0.1:50052",
            },
        },
    ),
    "kubevirt-zones-from-nodes": kubevirt(["", "europe-west1-b"]),
    "kubevirt-zones-configured": kubevirt(["europe-west1-b", "europe-west1-c"]),
    "single-replica": merged(BASE, {"replicaCount": 1}),
    "migrations-job": merged(BASE, {"migrations": {"job": {"enabled": True}}}),
    "migrations-job-external-secret": {
        "database": {"existingSecret": "pg-credentials"},
        "migrations": {"job": {"enabled": True}},
    },
    # A CloudNativePG Cluster: `--set database.cloudnativepg.enabled=true` alone.
    "cloudnativepg": {"database": {"cloudnativepg": {"enabled": True}}},
    "cloudnativepg-separate-reconciler": {
        "database": {"cloudnativepg": {"enabled": True}},
        "reconciler": {"separate": True},
    },
    "database-ca": {
        "database": {
            "existingSecret": "pg-credentials",
            "caSecret": "pg-server-ca",
            "caSecretKey": "root.crt",
        },
        "migrations": {"job": {"enabled": True}},
    },
    # `helm install --set postgresql.enabled=true` and nothing else.
    "evaluation-postgresql": {"postgresql": {"enabled": True}},
    "evaluation-postgresql-ephemeral": {
        "postgresql": {"enabled": True, "persistence": {"enabled": False}, "password": "x-y_z"},
        "networkPolicy": {"enabled": False},
    },
    "alerts-and-dashboard": merged(
        BASE,
        {
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "grafanaDashboard": {"enabled": True},
        },
    ),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, render: Any) -> tuple[dict[str, Any], Rendered]:
    values = VARIANTS[request.param]
    return values, render(values)


def all_strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in all_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in all_strings(v)]
    return [node] if isinstance(node, str) else []


# --- Helm itself --------------------------------------------------------------


def test_chart_metadata_and_default_image(chart: Any, render: Any) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == "0.1.0"
    image = render(BASE).container["image"]
    assert image == "ghcr.io/vmpool/vmpool:0.1.0"


@pytest.mark.parametrize(
    "name",
    [
        "default",
        "kubevirt-zones-from-nodes",
        "migrations-job",
        "evaluation-postgresql",
        "cloudnativepg",
    ],
)
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART_DIR, VARIANTS[name], strict=True, kube_version="v1.31.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_no_database_fails_with_a_message_naming_both_options(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        chart.render({}, name=RELEASE, namespace=NAMESPACE)
    assert "database.url" in str(err.value)
    assert "database.existingSecret" in str(err.value)


def test_two_database_sources_are_refused(chart: Any) -> None:
    values = {"database": {"url": DATABASE_URL, "existingSecret": "pg"}}
    with pytest.raises(helm.HelmRenderError, match=r"only one of database\.url"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicas": 3}, "replicas"),  # a typo of replicaCount
        ({"config": {"database_url": DATABASE_URL}}, "database_url"),
        ({"config": {"pools": [{"name": "a", "default_lease": "30 min"}]}}, "default_lease"),
        ({"config": {"provider": {"kind": "kvm"}}}, "kind"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(
    chart: Any, values: dict[str, Any], where: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.render(merged(BASE, values), name=RELEASE, namespace=NAMESPACE)


def test_schema_is_draft7_and_describes_config_as_an_object(chart: Any) -> None:
    schema = chart.schema
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["properties"]["config"]["type"] == "object"


def _schema_keys(node: dict[str, Any]) -> set[str]:
    return set(node["properties"])


def test_schema_config_keys_are_exactly_the_loaders(chart: Any) -> None:
    """A key the loader knows but the schema refuses (or the reverse) is a
    config an operator cannot write, or a typo that crash-loops the pods."""
    config = chart.schema["properties"]["config"]
    owned_by_chart = {
        "listen",
        "metrics_listen",
        "database_url",
        "data_dir",
        "tls",
        "health_listen",
    }
    assert _schema_keys(config) | owned_by_chart == set(Config.model_fields)
    assert "tls" not in _schema_keys(config)
    auth = config["properties"]["auth"]
    assert _schema_keys(auth) == set(AuthConfig.model_fields)
    assert _schema_keys(auth["properties"]["kubernetes"]) == set(KubernetesAuthConfig.model_fields)
    assert _schema_keys(auth["properties"]["jwt"]) == set(JwtAuthConfig.model_fields)
    assert _schema_keys(auth["properties"]["policy"]["items"]) == set(PolicyEntry.model_fields)
    assert _schema_keys(config["properties"]["limits"]) == set(LimitsConfig.model_fields)
    provider = config["properties"]["provider"]
    assert _schema_keys(provider) == set(ProviderConfig.model_fields)
    assert _schema_keys(provider["properties"]["fake"]) == set(FakeProviderConfig.model_fields)
    assert _schema_keys(provider["properties"]["kubevirt"]) == set(
        KubevirtProviderConfig.model_fields
    )
    assert _schema_keys(config["properties"]["pools"]["items"]) == set(PoolConfig.model_fields)
    assert _schema_keys(config["properties"]["tiers"]["items"]) == set(TierConfig.model_fields)
    assert _schema_keys(config["properties"]["hardware_templates"]["items"]) == set(
        HardwareTemplateConfig.model_fields
    )
    assert _schema_keys(config["properties"]["versions"]) == set(VersionsConfig.model_fields)
    assert _schema_keys(config["properties"]["database"]) == set(DatabaseConfig.model_fields)


# --- Every object is valid Kubernetes ----------------------------------------


def test_every_object_validates_against_kubernetes(variant: tuple[dict, Rendered]) -> None:
    _, rendered = variant
    errors = []
    for obj in rendered.objects:
        assert obj["metadata"]["name"], obj
        if obj["apiVersion"].startswith(CUSTOM_API_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {err.message}")
    assert errors == []


def test_namespaced_objects_land_in_the_release_namespace(variant: tuple[dict, Rendered]) -> None:
    values, rendered = variant
    vm_namespace = values.get("config", {}).get("provider", {}).get("kubevirt", {}).get("namespace")
    for obj in rendered.objects:
        if obj["kind"] in {"ClusterRole", "ClusterRoleBinding"}:
            assert "namespace" not in obj["metadata"]
        elif obj["kind"] in {"Role", "RoleBinding"}:
            assert obj["metadata"]["namespace"] == (vm_namespace or NAMESPACE)
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


# --- Config file -------------------------------------------------------------


def test_config_map_loads_with_the_services_own_loader(variant: tuple[dict, Rendered]) -> None:
    values, rendered = variant
    text = rendered.config_text()
    config = parse_config(yaml.safe_load(text), source="configmap")
    assert config.listen == "0.0.0.0:50051"
    assert config.metrics_listen == "0.0.0.0:9090"
    assert config.database_url == ""
    assert "database_url" not in text
    assert DATABASE_URL not in text
    pools = values.get("config", {}).get("pools")
    expected = [p["name"] for p in pools] if pools else ["small"]
    assert [p.name for p in config.pools] == expected


def test_config_map_defaults_match_the_spec() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    config = parse_config(values["config"])
    assert config.provider.kind == "fake"
    assert config.shutdown_grace.total_seconds() == 20
    assert config.reconcile_interval.total_seconds() == 1
    assert [p.name for p in config.pools] == ["small"]


def test_kubevirt_config_gets_namespace_deployment_and_template(render: Any) -> None:
    rendered = render(kubevirt(["europe-west1-b"]))
    config = parse_config(yaml.safe_load(rendered.config_text()))
    assert config.provider.kind == "kubevirt"
    assert config.provider.kubevirt.namespace == "vms"
    # Two releases in one namespace must not adopt (and delete) each other's VMs.
    assert config.provider.kubevirt.deployment == RELEASE
    assert config.pools[0].template == VM_TEMPLATE
    assert config.pools[0].labels == {"os": "cirros", "size": "2"}

    same_namespace = render(merged(BASE, {"config": {"provider": {"kind": "kubevirt"}}}))
    cfg = parse_config(yaml.safe_load(same_namespace.config_text()))
    assert cfg.provider.kubevirt.namespace == NAMESPACE


def test_config_change_rolls_the_pods(render: Any) -> None:
    def checksum(values: dict[str, Any]) -> str:
        annotations = render(values).deployment["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    assert checksum(BASE) != checksum(merged(BASE, {"config": {"log_level": "debug"}}))
    assert checksum(BASE) == checksum(merged(BASE, {"replicaCount": 3}))


# --- Database URL ------------------------------------------------------------


def test_database_url_reaches_the_pod_through_a_secret(render: Any) -> None:
    rendered = render(BASE)
    env = {e["name"]: e for e in rendered.container["env"]}
    ref = env["VMPOOL_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert rendered.secret_value(ref["name"], ref["key"]) == DATABASE_URL
    assert DATABASE_URL not in json.dumps(rendered.deployment)


def _derived_forms(secret: str) -> set[str]:
    """What a reader of an annotation could check a guessed secret against."""
    raw = secret.encode()
    forms = {secret, base64.b64encode(raw).decode(), raw.hex()}
    for name in ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "blake2b", "sha3_256"):
        digest = hashlib.new(name, raw)
        forms |= {digest.hexdigest(), base64.b64encode(digest.digest()).decode()}
    return forms


def _all_annotations(rendered: Rendered) -> dict[str, str]:
    """Every annotation of every object and pod template, by "object/key"."""
    found: dict[str, str] = {}
    for obj in rendered.objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        metas = [obj["metadata"], obj.get("spec", {}).get("template", {}).get("metadata", {})]
        for meta in metas:
            for key, value in (meta.get("annotations") or {}).items():
                found[f"{where}/{key}"] = str(value)
    return found


def test_no_annotation_is_derived_from_the_database_secret(render: Any) -> None:
    """Anyone allowed to get pods reads their annotations: an unsalted hash of the
    URL falls to a dictionary of passwords in seconds."""
    password = "hunter2"
    url = f"postgresql://vmpool:{password}@db.example.internal:5432/vmpool"
    for variant in (
        {"database": {"url": url}},
        {"database": {"url": url}, "reconciler": {"separate": True}},
    ):
        rendered = render(variant)
        annotations = _all_annotations(rendered)
        assert any(k.startswith("Deployment/") for k in annotations)
        forms = _derived_forms(password) | _derived_forms(url)
        leaked = {k: v for k, v in annotations.items() if any(f in v for f in forms)}
        assert not leaked, f"annotations derived from the database secret: {leaked}"


def test_database_url_change_rolls_the_pods_through_a_salted_hash(render: Any) -> None:
    """The roll annotation is sha256(salt + URL) with the salt from the chart's own
    Secret (kept across upgrades by lookup), the same in both Deployments."""
    rendered = render(merged(BASE, {"reconciler": {"separate": True}}))
    salt = rendered.secret_value(f"{RELEASE}-database", "roll-salt")
    assert len(salt) >= 32
    expected = hashlib.sha256((salt + DATABASE_URL).encode()).hexdigest()
    for deployment in rendered.all("Deployment"):
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["vmpool.dev/database-revision"] == expected
    # Rendered without a cluster there is nothing to look up: a fresh salt.
    again = render(merged(BASE, {"reconciler": {"separate": True}, "replicaCount": 3}))
    assert again.secret_value(f"{RELEASE}-database", "roll-salt") != salt


def test_existing_secret_is_referenced_and_none_is_created(render: Any) -> None:
    rendered = render(VARIANTS["external-secret"])
    assert rendered.all("Secret") == []
    env = {e["name"]: e for e in rendered.container["env"]}
    ref = env["VMPOOL_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "pg-credentials", "key": "dsn"}
    default_key = render({"database": {"existingSecret": "pg-credentials"}}).container["env"][0]
    assert default_key["valueFrom"]["secretKeyRef"]["key"] == "url"


# --- Deployment ----------------------------------------------------------------


def test_deployment_rolls_without_losing_capacity_and_spreads(render: Any) -> None:
    deployment = render(BASE).deployment
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = spec["template"]["spec"]
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    pod_labels = spec["template"]["metadata"]["labels"]
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()


def test_container_runs_the_server_with_the_mounted_config(render: Any) -> None:
    rendered = render(BASE)
    container = rendered.container
    assert container["command"] == ["vmpool", "serve", "--config", "/etc/vmpool/config.yaml"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert (
        volumes[mounts["/etc/vmpool"]]["configMap"]["name"]
        == rendered.one("ConfigMap")["metadata"]["name"]
    )
    assert "emptyDir" in volumes[mounts["/tmp"]]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}
    assert rendered.pod["enableServiceLinks"] is False


def test_a_separate_reconciler_deployment_runs_the_background_work_alone(
    render: Any,
) -> None:
    rendered = render(merged(BASE, {"reconciler": {"separate": True, "replicaCount": 3}}))
    deployments = {d["metadata"]["name"]: d for d in rendered.all("Deployment")}
    assert set(deployments) == {RELEASE, f"{RELEASE}-reconciler"}
    api, rec = deployments[RELEASE], deployments[f"{RELEASE}-reconciler"]
    api_container = api["spec"]["template"]["spec"]["containers"][0]
    rec_container = rec["spec"]["template"]["spec"]["containers"][0]
    assert api_container["command"][-2:] == ["--role", "api"]
    assert rec_container["command"][-2:] == ["--role", "reconciler"]
    assert rec["spec"]["replicas"] == 3
    assert [p["name"] for p in rec_container["ports"]] == ["metrics"]  # no gRPC port
    # Neither the server Deployment nor a server Service selects the reconciler
    # pods; their own metrics Service selects them and nothing else.
    rec_labels = rec["spec"]["template"]["metadata"]["labels"]
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in rendered.all("Service")}
    rec_metrics = services.pop(f"{RELEASE}-reconciler-metrics")
    for selector in [api["spec"]["selector"]["matchLabels"]] + [
        s["spec"]["selector"] for s in services.values()
    ]:
        assert not _matches(selector, rec_labels), selector
    assert _matches(rec_metrics["spec"]["selector"], rec_labels)
    assert not _matches(rec_metrics["spec"]["selector"], api_labels)
    [port] = rec_metrics["spec"]["ports"]
    assert (port["name"], port["targetPort"]) == ("metrics", "metrics")
    assert rec["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # Off (the default): one Deployment whose pods may all lead.
    default = render(BASE)
    assert [d["metadata"]["name"] for d in default.all("Deployment")] == [RELEASE]
    assert "--role" not in default.container["command"]


def test_pod_is_hardened(render: Any) -> None:
    rendered = render(BASE)
    pod_sc = rendered.pod["securityContext"]
    sc = rendered.container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = rendered.container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_probes_ready_on_the_database_alive_on_grpc_health(render: Any) -> None:
    container = render(BASE).container
    # Native gRPC health on the name that follows the database: no exec of Python.
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": READY}
    assert "exec" not in container["readinessProbe"]
    for probe in ("livenessProbe", "startupProbe"):
        # No `service`: the overall status, which does not consult the database.
        assert container[probe]["grpc"] == {"port": 50051}, probe
        assert "exec" not in container[probe]
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300


def test_shutdown_fits_in_the_termination_grace_period(render: Any, chart: Any) -> None:
    rendered = render(BASE)
    grace = rendered.pod["terminationGracePeriodSeconds"]
    config = parse_config(yaml.safe_load(rendered.config_text()))
    pre_stop = rendered.container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert grace == 30
    assert grace > config.shutdown_grace.total_seconds() + pre_stop

    too_long = merged(BASE, {"config": {"shutdown_grace": "1m"}})
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        chart.render(too_long, name=RELEASE, namespace=NAMESPACE)
    raised = merged(too_long, {"terminationGracePeriodSeconds": 90})
    assert render(raised).pod["terminationGracePeriodSeconds"] == 90


def test_clients_service_has_grpc_only_and_metrics_have_their_own(render: Any) -> None:
    rendered = render(BASE)
    service = rendered.one("Service", RELEASE)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc"}  # lease clients never see the metrics port
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["appProtocol"] == "grpc"
    metrics = rendered.one("Service", f"{RELEASE}-metrics")
    [metrics_port] = metrics["spec"]["ports"]
    assert (metrics_port["name"], metrics_port["port"]) == ("metrics", 9090)
    container_ports = {p["name"] for p in rendered.container["ports"]}
    assert {ports["grpc"]["targetPort"], metrics_port["targetPort"]} <= container_ports
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    for svc in (service, metrics):
        assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_pdb_only_with_more_than_one_replica(render: Any) -> None:
    pdb = render(BASE).one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = render(BASE).deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # One replica with minAvailable 1 would block every node drain.
    assert render(VARIANTS["single-replica"]).all("PodDisruptionBudget") == []


# --- RBAC ----------------------------------------------------------------------

RBAC_KINDS = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def rules_of(obj: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in obj["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_fake_provider_gets_no_rbac_and_no_api_token(render: Any) -> None:
    rendered = render(BASE)
    assert rendered.kinds() & RBAC_KINDS == set()
    assert rendered.pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", ["kubevirt-zones-from-nodes", "kubevirt-zones-configured"])
def test_kubevirt_role_grants_exactly_what_the_provider_uses(render: Any, name: str) -> None:
    rendered = render(VARIANTS[name])
    for obj in rendered.objects:
        if obj["kind"] in {"Role", "ClusterRole"}:
            assert "*" not in all_strings(obj["rules"]), obj["metadata"]["name"]
    role = rendered.one("Role")
    assert role["metadata"]["namespace"] == "vms"
    assert rules_of(role) == {
        ("kubevirt.io", "virtualmachines"): {"get", "list", "watch", "create", "delete"},
        ("kubevirt.io", "virtualmachineinstances"): {"get", "list", "watch"},
    }
    binding = rendered.one("RoleBinding")
    assert binding["metadata"]["namespace"] == "vms"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    service_account = rendered.one("ServiceAccount")["metadata"]["name"]
    assert rendered.pod["serviceAccountName"] == service_account
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}
    ]
    assert rendered.pod["automountServiceAccountToken"] is True


def test_nodes_are_readable_only_when_a_pool_takes_its_zone_from_them(render: Any) -> None:
    from_nodes = render(VARIANTS["kubevirt-zones-from-nodes"])
    cluster_role = from_nodes.one("ClusterRole")
    assert rules_of(cluster_role) == {("", "nodes"): {"get"}}
    crb = from_nodes.one("ClusterRoleBinding")
    assert crb["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert crb["subjects"][0]["namespace"] == NAMESPACE

    configured = render(VARIANTS["kubevirt-zones-configured"])
    assert configured.all("ClusterRole") == configured.all("ClusterRoleBinding") == []


# --- Optional objects ----------------------------------------------------------


def test_service_monitor_scrapes_the_metrics_port(render: Any) -> None:
    assert render(BASE).all("ServiceMonitor") == []
    rendered = render(VARIANTS["service-monitor"])
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = rendered.one("Service", f"{RELEASE}-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    assert selector <= service["metadata"]["labels"].items()
    assert not selector <= rendered.one("Service", RELEASE)["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_service_monitor_scrapes_the_reconciler_pods_too(render: Any) -> None:
    # With reconciler.separate the leader (vmpool_reconciler_leader, the pool
    # gauges) and the timeline watch run in the reconciler pods: unscraped,
    # VmpoolNoLeader fires for ever and VmpoolDatabaseFailover never does.
    rendered = render(
        merged(BASE, {"reconciler": {"separate": True}, "serviceMonitor": {"enabled": True}})
    )
    monitor = rendered.one("ServiceMonitor")["spec"]
    selector = monitor["selector"]["matchLabels"]
    [endpoint] = monitor["endpoints"]
    scraped: dict[str, dict[str, str]] = {}
    for service in rendered.all("Service"):
        if _matches(selector, service["metadata"]["labels"]):
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
            scraped[service["metadata"]["name"]] = service["spec"]["selector"]
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in rendered.all("Deployment")
    }
    for name, labels in pods.items():
        assert [s for s, sel in scraped.items() if _matches(sel, labels)], f"{name} not scraped"
    # Each pod through exactly one Service: no series scraped twice.
    for labels in pods.values():
        assert sum(_matches(sel, labels) for sel in scraped.values()) == 1
    # The NetworkPolicy lets Prometheus reach them, and nothing else.
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered.all("NetworkPolicy")}
    rec = policies[f"{RELEASE}-reconciler"]
    assert _matches(rec["podSelector"]["matchLabels"], pods[f"{RELEASE}-reconciler"])
    assert not _matches(rec["podSelector"]["matchLabels"], pods[RELEASE])
    assert [r["ports"] for r in rec["ingress"]] == [[{"port": "metrics", "protocol": "TCP"}]]
    assert rec["ingress"][0]["from"] == policies[RELEASE]["ingress"][-1]["from"]


def _policy_by_port(rendered: Rendered) -> dict[str, Any]:
    policy = rendered.one("NetworkPolicy")["spec"]
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    return {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}


LABELLED_CLIENTS = {
    "podSelector": {"matchLabels": {"vmpool.dev/client": "true"}},
    "namespaceSelector": {},
}


def test_network_policy_is_on_by_default_and_admits_named_clients_only(render: Any) -> None:
    by_port = _policy_by_port(render(BASE))
    assert set(by_port) == {"grpc", "metrics"}
    assert by_port["grpc"]["from"] == [LABELLED_CLIENTS]
    assert by_port["metrics"]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    more = _policy_by_port(render(VARIANTS["network-policy"]))
    assert more["grpc"]["from"] == [
        LABELLED_CLIENTS,
        {"namespaceSelector": {"matchLabels": {"team": "robots"}}},
    ]
    # "Any source" only when asked for.
    anyone = _policy_by_port(render(VARIANTS["network-policy-any-source"]))
    assert "from" not in anyone["grpc"]
    assert render(merged(BASE, {"networkPolicy": {"enabled": False}})).all("NetworkPolicy") == []


def _mounted_tls(rendered: Rendered) -> str:
    [volume] = [v for v in rendered.pod["volumes"] if v["name"] == "tls"]
    mounts = {m["name"]: m["mountPath"] for m in rendered.container["volumeMounts"]}
    assert mounts["tls"] == "/etc/vmpool/tls"
    name: str = volume["secret"]["secretName"]
    return name


def test_tls_from_cert_manager(render: Any) -> None:
    rendered = render(VARIANTS["tls-cert-manager"])
    cert = rendered.one("Certificate")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["spec"]["issuerRef"] == {"name": "ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert f"{RELEASE}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    assert _mounted_tls(rendered) == cert["spec"]["secretName"]
    config = parse_config(yaml.safe_load(rendered.config_text()))
    assert config.tls.cert_file == "/etc/vmpool/tls/tls.crt"
    assert config.tls.key_file == "/etc/vmpool/tls/tls.key"
    assert not config.tls.client_ca_file
    # The kubelet's gRPC probe has no TLS: the probes use the plaintext health-only port.
    assert config.health_listen == "0.0.0.0:50052"
    ports = {p["name"]: p["containerPort"] for p in rendered.container["ports"]}
    assert ports["health"] == 50052
    assert rendered.container["readinessProbe"]["grpc"] == {"port": 50052, "service": READY}
    for probe in ("livenessProbe", "startupProbe"):
        assert rendered.container[probe]["grpc"] == {"port": 50052}
    assert "health_listen" not in yaml.safe_load(render(BASE).config_text())
    assert render(BASE).all("Certificate") == []
    assert "tls" not in yaml.safe_load(render(BASE).config_text())


def test_tls_from_an_existing_secret_with_client_certificates(render: Any) -> None:
    rendered = render(VARIANTS["tls-mtls"])
    assert rendered.all("Certificate") == []
    assert _mounted_tls(rendered) == "vmpool-serving"
    config = parse_config(yaml.safe_load(rendered.config_text()))
    assert config.tls.client_ca_file == "/etc/vmpool/tls/ca.crt"
    assert config.tls.require_client_cert
    assert config.auth.mode == "mtls"
    assert rendered.container["readinessProbe"]["grpc"] == {"port": 50052, "service": READY}


def test_tls_needs_a_certificate_source_and_config_tls_is_refused(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"tls\.existingSecret"):
        chart.render(merged(BASE, {"tls": {"enabled": True}}), name=RELEASE, namespace=NAMESPACE)
    # The schema refuses it before the template would.
    with pytest.raises(helm.HelmValuesError, match=r"/config.*'tls' not allowed"):
        chart.render(
            merged(BASE, {"config": {"tls": {"cert_file": "x"}}}), name=RELEASE, namespace=NAMESPACE
        )


def test_token_review_permission_only_for_kubernetes_auth(render: Any) -> None:
    rendered = render(VARIANTS["auth-kubernetes"])
    [binding] = rendered.all("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "system:auth-delegator"
    assert binding["subjects"][0]["name"] == rendered.pod["serviceAccountName"]
    assert rendered.pod["automountServiceAccountToken"] is True  # TokenReview needs it
    config = parse_config(yaml.safe_load(rendered.config_text()))
    assert config.auth.policy[0].max_queued_reservations == 20
    assert config.limits.max_active_leases == 50
    assert config.admin_listen == "127.0.0.1:50052"
    for name in ("default", "tls-mtls", "tls-cert-manager"):
        bindings = render(VARIANTS[name]).all("ClusterRoleBinding")
        assert not [b for b in bindings if b["roleRef"]["name"] == "system:auth-delegator"]


def test_migration_job_is_off_by_default(render: Any) -> None:
    assert render(BASE).all("Job") == []


@pytest.mark.parametrize("name", ["migrations-job", "migrations-job-external-secret"])
def test_migration_job_runs_before_install_and_upgrade(render: Any, name: str) -> None:
    rendered = render(VARIANTS[name])
    job = rendered.one("Job")
    hooks = job["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["vmpool", "migrate", "--config", "/etc/vmpool/config.yaml"]
    assert pod["restartPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # The release's own ConfigMap and Secret do not exist yet at pre-install:
    # everything the Job mounts must be a hook created before it, or external.
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_name = volumes["config"]["configMap"]["name"]
    config_map = rendered.one("ConfigMap", config_name)
    cm_hooks = config_map["metadata"]["annotations"]
    assert set(cm_hooks["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert int(cm_hooks["helm.sh/hook-weight"]) < int(hooks["helm.sh/hook-weight"])
    parse_config(yaml.safe_load(config_map["data"]["config.yaml"]))

    ref = container["env"][0]["valueFrom"]["secretKeyRef"]
    if "database" in VARIANTS[name] and "url" in VARIANTS[name]["database"]:
        secret = rendered.one("Secret", ref["name"])
        assert "helm.sh/hook" in secret["metadata"]["annotations"]
        assert rendered.secret_value(ref["name"], ref["key"]) == DATABASE_URL
    else:
        assert ref == {"name": "pg-credentials", "key": "url"}


# --- Image and docs agree with the chart ---------------------------------------


def test_dockerfile_user_and_entrypoint_match_the_chart(render: Any) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert "pip wheel" in dockerfile
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    run_as = render(BASE).container["securityContext"]["runAsUser"]
    assert users and users[-1].split(":")[0] == str(run_as)
    assert re.search(r'^ENTRYPOINT \["vmpool"\]', dockerfile, re.M)


# Values documented as one row: blocks of Kubernetes fields, and `config`
# (which has its own table).
WHOLE_BLOCKS = {
    "config",
    "reconciler.resources",
    "podSecurityContext",
    "securityContext",
    "resources",
    "networkPolicy.metricsNamespaceSelector",
    "networkPolicy.clientPodLabels",
    "migrations.job.resources",
    "postgresql.resources",
    "grafanaDashboard.labels",
}


def _value_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node and prefix not in WHOLE_BLOCKS:
        return [
            path
            for key, value in node.items()
            for path in _value_paths(value, f"{prefix}.{key}" if prefix else key)
        ]
    return [prefix]


def test_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    readme = (CHART_DIR / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    missing = [p for p in _value_paths(values) if p not in documented]
    assert missing == []


def test_operations_doc_explains_every_metric() -> None:
    from vmpool.ops.metrics import Metrics

    doc = (REPO / "docs" / "operations.md").read_text()
    names = {
        m.name + ("_total" if m.type == "counter" else "") for m in Metrics().registry.collect()
    }
    assert names
    missing = sorted(n for n in names if n not in doc)
    assert missing == []


def test_readme_links_exist() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [t.partition("#")[0] for t in links if not re.match(r"[a-z]+:|#", t)]
    assert local, f"no relative links in the chart README (it links the docs): {links}"
    assert [t for t in local if not (CHART_DIR / t).resolve().exists()] == []


# --- Evaluation database, alerts, dashboard, NOTES ------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_evaluation_postgresql_alone_is_a_working_install(render: Any) -> None:
    rendered = render(VARIANTS["evaluation-postgresql"])
    pg_name = f"{RELEASE}-postgresql"
    sts = rendered.one("StatefulSet", pg_name)
    assert sts["spec"]["replicas"] == 1
    assert "not-for-production" in json.dumps(sts["metadata"]["annotations"])
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    pg_service = rendered.one("Service", pg_name)
    assert _matches(pg_service["spec"]["selector"], pod_labels)
    assert pg_service["spec"]["ports"][0]["port"] == 5432
    # The vmpool Services, PDB and policy never select the database pod.
    for svc in rendered.all("Service"):
        if svc["metadata"]["name"] != pg_name:
            assert not _matches(svc["spec"]["selector"], pod_labels), svc["metadata"]["name"]
    # The server's URL points at that Service, with the generated password.
    env = {e["name"]: e for e in rendered.container["env"]}
    ref = env["VMPOOL_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": pg_name, "key": "url"}
    url = rendered.secret_value(pg_name, "url")
    password = rendered.secret_value(pg_name, "password")
    assert len(password) >= 24
    assert url == (f"postgresql://vmpool:{password}@{pg_name}.{NAMESPACE}.svc:5432/vmpool"), (
        "the URL names the Service and the database the StatefulSet creates"
    )
    container = sts["spec"]["template"]["spec"]["containers"][0]
    pg_env = {e["name"]: e for e in container["env"]}
    assert (
        pg_env["POSTGRES_DB"]["value"] == "vmpool" and pg_env["POSTGRES_USER"]["value"] == "vmpool"
    )
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": pg_name,
        "key": "password",
    }
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    # Only vmpool's pods may reach it.
    policy = rendered.one("NetworkPolicy", pg_name)
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    (peer,) = policy["spec"]["ingress"][0]["from"]
    assert _matches(peer["podSelector"]["matchLabels"], rendered.pod_labels())
    notes = rendered.manifests[next(p for p in rendered.manifests if p.endswith("NOTES.txt"))]
    assert "NOT FOR PRODUCTION" in notes


def test_evaluation_postgresql_excludes_other_database_sources(chart: Any) -> None:
    for values in (
        {"postgresql": {"enabled": True}, "database": {"url": DATABASE_URL}},
        {"postgresql": {"enabled": True}, "database": {"existingSecret": "pg"}},
        {"postgresql": {"enabled": True}, "migrations": {"job": {"enabled": True}}},
    ):
        with pytest.raises(helm.HelmRenderError, match=r"postgresql\.enabled"):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match=r"postgresql\.enabled=true"):
        chart.render({}, name=RELEASE, namespace=NAMESPACE)


def _documented_alerts() -> dict[str, Any]:
    doc = (REPO / "docs" / "operations.md").read_text()
    section = doc[doc.index("## Alerts worth setting") :]
    block = section[section.index("```yaml\n") + 8 : section.index("```\n", 1)]
    rules: dict[str, Any] = yaml.safe_load(block)
    return rules


def _known_metric_names() -> set[str]:
    from vmpool.ops.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        names |= {s.name for s in family.samples} | {family.name}
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + "_bucket", family.name + "_sum", family.name + "_count"}
    return names


def _selectors(expr: str) -> list[str]:
    import promql_parser

    found: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_prometheus_rule_is_the_documented_alerts_with_valid_promql(render: Any) -> None:
    rendered = render(VARIANTS["alerts-and-dashboard"])
    rule = rendered.one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == _documented_alerts(), "docs/operations.md shows the chart's rules"
    assert render(BASE).all("PrometheusRule") == []
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    known = _known_metric_names() | recorded | {"kube_deployment_status_replicas_available"}
    alerts = [r for r in rules if "alert" in r]
    assert len(alerts) >= 10
    for r in rules:
        assert r["expr"].strip(), r
        names = _selectors(r["expr"])  # parses, or raises naming the mistake
        assert names and set(names) <= known, (r.get("alert") or r["record"], names)
    for a in alerts:
        assert a["labels"]["severity"] in {"page", "warn", "ticket", "info"}, a
        assert a["annotations"]["summary"], a
    min_ready = next(a for a in alerts if a["alert"] == "VmpoolPoolBelowMinReady")
    assert "vmpool_pool_min_ready" in min_ready["expr"]
    # A release's own Deployment in the readiness alert.
    renamed = render(merged(VARIANTS["alerts-and-dashboard"], {"fullnameOverride": "lab-pool"}))
    no_ready = next(
        r
        for g in renamed.one("PrometheusRule")["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == "VmpoolNoReadyPods"
    )
    assert 'deployment="lab-pool"' in no_ready["expr"]


@pytest.mark.parametrize(
    ("alert", "metric", "op", "severity", "for_"),
    [
        ("VmpoolDatabaseUnreachable", "vmpool_database_up", "==", "page", "1m"),
        ("VmpoolDatabaseReadOnly", "vmpool_database_read_only", ">", "page", "1m"),
        ("VmpoolDatabaseReconnecting", "vmpool_database_reconnects_total", ">", "warn", "15m"),
        ("VmpoolDatabaseFailover", "vmpool_database_timeline_changes_total", ">", "info", None),
    ],
)
def test_prometheus_rule_alerts_on_a_database_failover(
    render: Any, alert: str, metric: str, op: str, severity: str, for_: str | None
) -> None:
    """An unreachable database, a read-only session, reconnects that do not stop
    and a promotion each raise an alert naming the pod (operations guide,
    "PostgreSQL high availability")."""
    import promql_parser

    rule = next(
        r
        for g in render(VARIANTS["alerts-and-dashboard"]).one("PrometheusRule")["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == alert
    )
    expr = promql_parser.parse(rule["expr"])
    assert isinstance(expr, promql_parser.BinaryExpr) and str(expr.op) == op, rule["expr"]
    assert isinstance(expr.rhs, promql_parser.NumberLiteral), rule["expr"]
    assert _selectors(rule["expr"]) == [metric]
    assert rule["labels"]["severity"] == severity
    assert rule.get("for") == for_
    assert "{{ $labels.instance }}" in rule["annotations"]["summary"]
    assert alert in (REPO / "docs" / "operations.md").read_text().split("## Metrics\n")[0]


def test_grafana_dashboard_parses_and_charts_existing_metrics(render: Any) -> None:
    rendered = render(VARIANTS["alerts-and-dashboard"])
    cm = rendered.one("ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len(panels) >= 10
    known = _known_metric_names()
    charted = set()
    for panel in panels:
        assert panel["title"] and panel["targets"], panel
        for target in panel["targets"]:
            expr = target["expr"].replace("$job", "x")
            names = _selectors(expr)
            assert names and set(names) <= known, (panel["title"], names)
            charted |= set(names)
    for must in ("vmpool_instances", "vmpool_pool_min_ready", "vmpool_lease_wait_seconds_bucket"):
        assert must in charted
    assert render(BASE).all("ConfigMap") == [render(BASE).one("ConfigMap", RELEASE)]


def test_notes_need_only_kubectl_and_name_no_missing_documents(render: Any) -> None:
    for name in ("default", "evaluation-postgresql", "tls-cert-manager", "cloudnativepg"):
        rendered = render(VARIANTS[name])
        notes = rendered.manifests[next(p for p in rendered.manifests if p.endswith("NOTES.txt"))]
        commands = [ln.strip() for ln in notes.splitlines() if ln.startswith("  kubectl")]
        assert any("exec" in c and "vmpool ping" in c for c in commands), notes
        assert "docs/" not in notes and "section 7" not in notes, notes


def test_no_value_or_schema_refers_to_documents_operators_lack() -> None:
    for path in (
        CHART_DIR / "values.yaml",
        CHART_DIR / "values.schema.json",
        CHART_DIR / "README.md",
    ):
        text = path.read_text()
        assert not re.search(r"spec(\'s)? section|section 7", text), path


def _notes(rendered: Rendered) -> str:
    return rendered.manifests[next(p for p in rendered.manifests if p.endswith("NOTES.txt"))]


@pytest.mark.parametrize(
    ("variant", "secret", "credentials"),
    [
        ("tls-cert-manager", "vmpool-tls", None),
        ("auth-kubernetes", "vmpool-serving", "--token-file TOKEN"),
        ("tls-mtls", "vmpool-serving", "--cert client.crt --key client.key"),
    ],
)
def test_notes_say_where_the_ca_and_the_credentials_come_from(
    render: Any, variant: str, secret: str, credentials: str | None
) -> None:
    # An operator copying the NOTES must not be left with a `--ca ca.crt` they
    # have no file for, a token flag in mtls mode, or a status command that is
    # refused for want of credentials.
    notes = _notes(render(VARIANTS[variant]))
    assert f"get secret {secret} -o jsonpath='{{.data.ca\\.crt}}' | base64 -d > ca.crt" in notes
    lease = next(ln for ln in notes.splitlines() if ln.strip().startswith("vmpool lease"))
    if credentials is None:
        assert "--token-file" not in lease and "--cert" not in lease, lease
        assert "exec deployment/vmpool -- vmpool status" in notes
    else:
        assert lease.endswith(credentials), lease
        assert "exec deployment/vmpool -- vmpool status" not in notes, notes
    token_made = "create token SERVICEACCOUNT --audience vmpool > TOKEN" in notes
    assert token_made == (variant == "auth-kubernetes"), notes
    # With client certificates required, the in-pod ping cannot go without one.
    assert ("this ping too: add --cert FILE --key FILE" in notes) == (variant == "tls-mtls")


# --- CloudNativePG (database.cloudnativepg) --------------------------------------

#: The CRD of CloudNativePG's Cluster, from shared/ beside the checkout.
CNPG_CRD = (REPO / ".." / "shared" / "cnpg" / "postgresql.cnpg.io_clusters.yaml").resolve()
CNPG_NAME = f"{RELEASE}-pg"

#: The Cluster CRD's CEL rules (x-kubernetes-validations), in Python, for the
#: ones a rendered Cluster can reach. A rule missing here fails the test that
#: reaches it: translate it when the CRD gains one.
CEL_CHECKS: dict[str, Any] = {
    "!has(self.builtinLocale) || self.localeProvider == 'builtin'": lambda s: (
        "builtinLocale" not in s or s.get("localeProvider") == "builtin"
    ),
    "!has(self.icuLocale) || self.localeProvider == 'icu'": lambda s: (
        "icuLocale" not in s or s.get("localeProvider") == "icu"
    ),
    "!has(self.icuRules) || self.localeProvider == 'icu'": lambda s: (
        "icuRules" not in s or s.get("localeProvider") == "icu"
    ),
    "self > 0": lambda s: s > 0,
    "self.dataDurability!='preferred' || ((!has(self.standbyNamesPre) || "
    "self.standbyNamesPre.size()==0) && (!has(self.standbyNamesPost) || "
    "self.standbyNamesPost.size()==0))": lambda s: (
        s.get("dataDurability") != "preferred"
        or (not s.get("standbyNamesPre") and not s.get("standbyNamesPost"))
    ),
    "!(has(self.podFailureDomainKeys) && self.podFailureDomainKeys.size() > 0 && "
    "has(self.nodeFailureDomainKeys) && self.nodeFailureDomainKeys.size() > 0)": lambda s: (
        not (s.get("podFailureDomainKeys") and s.get("nodeFailureDomainKeys"))
    ),
    "!(has(self.syncReplicaElectionConstraint) && self.syncReplicaElectionConstraint.enabled "
    "&& has(self.synchronous) && ((has(self.synchronous.podFailureDomainKeys) && "
    "self.synchronous.podFailureDomainKeys.size() > 0) || "
    "(has(self.synchronous.nodeFailureDomainKeys) && "
    "self.synchronous.nodeFailureDomainKeys.size() > 0)))": lambda s: (
        not (
            s.get("syncReplicaElectionConstraint", {}).get("enabled")
            and (
                s.get("synchronous", {}).get("podFailureDomainKeys")
                or s.get("synchronous", {}).get("nodeFailureDomainKeys")
            )
        )
    ),
    "!(has(self.imageCatalogRef) && has(self.imageName))": lambda s: (
        not ("imageCatalogRef" in s and "imageName" in s)
    ),
    # A transition rule: the API server checks it on updates only.
    "self == oldSelf": lambda s: True,
}


def _cluster_errors(cluster: dict[str, Any]) -> list[str]:
    """Every way a Cluster breaks the CRD: its schema, strictly, and its CEL rules."""
    import jsonschema

    schema, rules = to_json_schema(load_crd_schema(CNPG_CRD, "v1"))
    found = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(cluster), key=lambda e: list(e.path)
    )
    errors = [f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}" for e in found]
    for rule in rules:
        for value in reach(cluster, rule.path):
            check = CEL_CHECKS.get(rule.rule)
            if check is None:
                errors.append(f"{rule.path}: CEL rule this test cannot check: {rule.rule}")
            elif not check(value):
                errors.append(f"{rule.path}: {rule.message}")
    return errors


def test_cloudnativepg_cluster_is_valid_against_the_crd(render: Any) -> None:
    cluster = render(VARIANTS["cloudnativepg"]).one("Cluster", CNPG_NAME)
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    assert _cluster_errors(cluster) == []
    # The check is strict: a misspelt field, a value outside an enum, a
    # broken CEL rule, a missing required field are each found.
    for path, bad in (
        (("spec", "instance"), 3),
        (("spec", "postgresql", "synchronous", "dataDurability"), "strict"),
        (("spec", "postgresql", "synchronous", "number"), 0),
        (("spec", "storage", "size"), {"gi": 10}),
    ):
        broken = copy.deepcopy(cluster)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        assert _cluster_errors(broken) != [], path
    no_method = copy.deepcopy(cluster)
    del no_method["spec"]["postgresql"]["synchronous"]["method"]
    assert any("'method' is a required property" in e for e in _cluster_errors(no_method))


def test_cloudnativepg_cluster_replicates_synchronously_and_owns_the_database(
    render: Any,
) -> None:
    spec = render(VARIANTS["cloudnativepg"]).one("Cluster", CNPG_NAME)["spec"]
    assert spec["instances"] == 3
    # A commit is acknowledged only once a standby has it, and writes wait
    # rather than go on without one: a promotion never loses a granted lease.
    # And a standby is promoted only when it surely holds every such commit.
    assert spec["postgresql"]["synchronous"] == {
        "method": "any",
        "number": 1,
        "dataDurability": "required",
        "failoverQuorum": True,
    }
    assert spec["postgresql"]["parameters"]["synchronous_commit"] == "on"
    assert spec["bootstrap"]["initdb"] == {"database": "vmpool", "owner": "vmpool"}
    assert spec["storage"]["size"]
    assert "enableSuperuserAccess" not in spec  # the operator's default: off
    # vmpool itself checks at start that commits wait for a standby.
    config = parse_config(yaml.safe_load(render(VARIANTS["cloudnativepg"]).config_text()))
    assert config.database.require_synchronous_standby == "warn"
    strict = {"enabled": True}, {"database": {"require_synchronous_standby": True}}
    chosen = render({"database": {"cloudnativepg": strict[0]}, "config": strict[1]})
    assert parse_config(yaml.safe_load(chosen.config_text())).database.require_synchronous_standby
    assert "require_synchronous_standby" not in render(BASE).config_text()

    tuned = render(
        {
            "database": {
                "cloudnativepg": {
                    "enabled": True,
                    "instances": 5,
                    "synchronous": {"method": "first", "number": 2, "dataDurability": "required"},
                    "parameters": {"max_connections": 300, "synchronous_commit": "remote_apply"},
                    "storage": {"size": "50Gi", "storageClass": "fast"},
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                    "imageName": "ghcr.io/cloudnative-pg/postgresql:17.2",
                }
            }
        }
    ).one("Cluster", CNPG_NAME)
    assert _cluster_errors(tuned) == []
    assert tuned["spec"]["postgresql"]["parameters"] == {
        "max_connections": "300",
        "synchronous_commit": "remote_apply",
    }
    assert tuned["spec"]["storage"] == {"size": "50Gi", "storageClass": "fast"}


def test_cloudnativepg_refuses_settings_that_acknowledge_unreplicated_commits(chart: Any) -> None:
    def values(**cnpg: Any) -> dict[str, Any]:
        return {"database": {"cloudnativepg": {"enabled": True, **cnpg}}}

    for bad, message in (
        (values(parameters={"synchronous_commit": "local"}), "synchronous_commit"),
        (values(parameters={"synchronous_commit": "off"}), "synchronous_commit"),
        (
            values(synchronous={"method": "any", "number": 3, "dataDurability": "required"}),
            "synchronous.number",
        ),
    ):
        with pytest.raises(helm.HelmRenderError, match=message):
            chart.render(bad, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmValuesError, match="instances"):
        chart.render(values(instances=1), name=RELEASE, namespace=NAMESPACE)


def test_cloudnativepg_excludes_other_database_sources(chart: Any) -> None:
    cnpg = {"cloudnativepg": {"enabled": True}}
    for values in (
        {"database": {**cnpg, "url": DATABASE_URL}},
        {"database": {**cnpg, "existingSecret": "pg"}},
        {"database": cnpg, "postgresql": {"enabled": True}},
        {"database": cnpg, "migrations": {"job": {"enabled": True}}},
    ):
        with pytest.raises(helm.HelmRenderError, match=r"database\.cloudnativepg\.enabled"):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match=r"database\.cloudnativepg\.enabled"):
        chart.render({}, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("name", ["cloudnativepg", "cloudnativepg-separate-reconciler"])
def test_cloudnativepg_pods_reach_the_primary_verified_with_the_app_password(
    render: Any, name: str
) -> None:
    rendered = render(VARIANTS[name])
    cluster = rendered.one("Cluster", CNPG_NAME)
    pods = [d["spec"]["template"]["spec"] for d in rendered.all("Deployment")]
    assert len(pods) == (2 if "separate" in name else 1)
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        # The password from the operator's app Secret; asyncpg takes PGPASSWORD
        # when the URL has none, so no password is escaped into a URL.
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{CNPG_NAME}-app",
            "key": "password",
        }
        url = env["VMPOOL_DATABASE_URL"]["value"]
        assert check_database_url(url) == url
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        # The -rw Service follows the primary; a standby behind it is refused.
        assert parts.hostname == f"{CNPG_NAME}-rw.{NAMESPACE}.svc"
        assert parts.port == 5432 and parts.password is None
        assert parts.username == cluster["spec"]["bootstrap"]["initdb"]["owner"]
        assert parts.path == "/" + cluster["spec"]["bootstrap"]["initdb"]["database"]
        assert query["target_session_attrs"] == "read-write"
        # The server is verified against the cluster's own CA; its key stays out.
        assert query["sslmode"] == "verify-full"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        ca_dir, ca_file = query["sslrootcert"].rsplit("/", 1)
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[ca_dir])
        assert volume["secret"] == {
            "secretName": f"{CNPG_NAME}-ca",
            "items": [{"key": "ca.crt", "path": ca_file}],
        }
    # No URL Secret and no evaluation database of the chart's own.
    assert rendered.all("StatefulSet") == []
    assert [s["metadata"]["name"] for s in rendered.all("Secret")] == []
    assert "Cluster" not in render(BASE).kinds()
    assert "PGPASSWORD" not in json.dumps(render(BASE).objects)


def test_cloudnativepg_notes_name_the_cluster_and_its_secrets(render: Any) -> None:
    notes = _notes(render(VARIANTS["cloudnativepg"]))
    assert f"get cluster.postgresql.cnpg.io {CNPG_NAME}" in notes
    assert f"{CNPG_NAME}-app" in notes and f"{CNPG_NAME}-ca" in notes
    assert "CloudNativePG" not in _notes(render(BASE))


def test_database_ca_secret_is_mounted_for_a_verify_full_url(render: Any) -> None:
    rendered = render(VARIANTS["database-ca"])
    job = rendered.one("Job", f"{RELEASE}-migrate")["spec"]["template"]["spec"]
    for pod in (rendered.pod, job):
        (container,) = pod["containers"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "database-ca")
        assert mount["mountPath"] == "/etc/vmpool/database-ca" and mount["readOnly"]
        volume = next(v for v in pod["volumes"] if v["name"] == "database-ca")
        assert volume["secret"] == {
            "secretName": "pg-server-ca",
            "items": [{"key": "root.crt", "path": "ca.crt"}],
        }
    assert "database-ca" not in json.dumps(render(BASE).deployment)
