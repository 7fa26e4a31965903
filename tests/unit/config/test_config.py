from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from vmpool.config.loading import ConfigError, load_config, parse_config

SPEC_EXAMPLE = """
listen: "0.0.0.0:50051"
metrics_listen: "0.0.0.0:9090"
database_url: ""
data_dir: ".vmpool"
reconcile_interval: "1s"
default_pool: "small"
provider:
  kind: fake
  fake:
    boot_seconds: 2
    failure_rate: 0.0
  kubevirt:
    namespace: vmpool
    kubeconfig: ""
pools:
  - name: small
    labels: {os: cirros, size: small}
    zone: ""
    min_ready: 2
    max_size: 10
    max_provisioning: 5
    default_lease: 30m
    max_lease: 24h
    max_lifetime: ""
    reservation_ttl: 5m
    boot_timeout: 10m
    max_ready_age: ""
    template: {}
"""


def test_the_spec_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SPEC_EXAMPLE)
    config = load_config(path, {})
    pool = config.pools[0]
    assert pool.default_lease == timedelta(minutes=30)
    assert pool.max_lifetime is None and pool.max_ready_age is None
    assert config.default_pool == "small"


def test_env_overrides_database_url(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SPEC_EXAMPLE)
    config = load_config(path, {"VMPOOL_DATABASE_URL": "postgresql://db/x"})
    assert config.database_url == "postgresql://db/x"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"pools": [{"name": "a", "max_lease": "soon"}]}, "pools[0].max_lease"),
        ({"pools": [{"name": "a", "min_ready": -1}]}, "pools[0].min_ready"),
        ({"pools": [{"name": "a", "min_ready": 5, "max_size": 2}]}, "min_ready"),
        ({"pools": [{"name": "Bad_Name"}]}, "pools[0].name"),
        ({"pools": [{"name": "a"}, {"name": "a"}]}, "duplicate pool name"),
        ({"default_pool": "nope"}, "default_pool"),
        ({"provider": {"kind": "vmware"}}, "provider.kind"),
        ({"provider": {"fake": {"failure_rate": 2}}}, "provider.fake.failure_rate"),
        ({"reconcile_interval": "0s"}, "reconcile_interval"),
        ({"listen": "50051"}, "listen"),
        ({"poolz": []}, "poolz: unknown key"),
    ],
)
def test_bad_config_names_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert key in str(err.value)


def test_bad_file_stops_serve_with_exit_2_and_one_message(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pools:\n  - name: a\n    max_size: lots\n")
    result = subprocess.run(
        [sys.executable, "-m", "vmpool", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pools[0].max_size" in lines[0]
    assert "Traceback" not in result.stderr


def test_flags_win_over_the_file_and_are_checked_with_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("metrics_listen: 127.0.0.1:9090\n")
    flags = {"listen": "127.0.0.1:0", "metrics_listen": ""}
    config = load_config(path, {}, flags)
    assert (config.listen, config.metrics_listen) == ("127.0.0.1:0", "")
    with pytest.raises(ConfigError) as err:
        load_config(path, {}, {"metrics_listen": "nowhere"})
    assert err.value.lines() == ["--metrics-listen: 'nowhere' is not HOST:PORT"]
    result = subprocess.run(
        [sys.executable, "-m", "vmpool", "serve", "--config", str(path), "--listen", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vmpool: bad config: --listen: 'x' is not HOST:PORT"
    ]


def test_unparseable_yaml_is_one_message(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pools: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", {})


def test_labels_become_strings() -> None:
    config = parse_config({"pools": [{"name": "a", "labels": {"size": 2, "gpu": True}}]})
    assert config.pools[0].labels == {"size": "2", "gpu": "True"}


def test_identity_keys_are_checked() -> None:
    bad = [
        ({"auth": {"mode": "jwt"}}, "jwt.issuer"),
        ({"auth": {"mode": "jwt", "jwt": {"issuer": "i"}}}, "jwks_url"),
        ({"auth": {"mode": "mtls"}}, "client_ca_file"),
        ({"tls": {"cert_file": "c"}}, "key_file"),
        ({"auth": {"policy": [{"subject": "x", "roles": ["root"]}]}}, "auth.policy[0].roles"),
        ({"limits": {"max_queued_reservations": -1}}, "limits.max_queued_reservations"),
        ({"pools": [{"name": "a", "max_size": 10001}]}, "pools[0].max_size"),
        ({"pools": [{"name": "a", "reservation_ttl": "3651d"}]}, "10 years"),
        ({"pools": [{"name": "a", "labels": {"k": "v\x00"}}]}, "pools[0].labels.k: contains a NUL"),
    ]
    for data, needle in bad:
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            parse_config(data)


def test_nul_in_the_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"pools:\n- name: a\n  zone: z\x00z\n")
    with pytest.raises(ConfigError, match=r"pools\[0\]\.zone: contains a NUL"):
        load_config(path)
