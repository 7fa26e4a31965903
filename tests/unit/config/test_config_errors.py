"""Configuration mistakes as an operator meets them: each one named, all at once,
one line each, exit 2, and no traceback from `vmpool serve` or `vmpool migrate`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server import free_port
from vmpool.config.loading import ConfigError, load_config, parse_config


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if k != "VMPOOL_DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "vmpool", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**full_env, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def one_line_each(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()


@pytest.mark.parametrize("key", ["reconcile_interval", "shutdown_grace"])
def test_a_bare_number_duration_names_the_key_and_says_why(key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({key: 90})
    text = str(err.value)
    assert f"{key}: 90 is a bare number" in text and '"90s"' in text, text


@pytest.mark.parametrize(
    "key",
    [
        "reconcile_interval",
        "reconciler.leader_ttl",
        "reconciler.lease_history_retention",
        "reconciler.lease_events_retention",
    ],
)
def test_a_duration_that_must_be_positive_names_the_key(key: str) -> None:
    section, _, name = key.rpartition(".")
    data: dict[str, object] = {section: {name: "0s"}} if section else {name: "0s"}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert f"{key}: must be positive" in str(err.value), str(err.value)


def test_a_bare_number_pool_duration_names_the_pool_key() -> None:
    with pytest.raises(ConfigError, match=r"pools\[0\]\.reservation_ttl: 60 is a bare number"):
        parse_config({"pools": [{"name": "a", "reservation_ttl": 60}]})
    assert parse_config({"reconcile_interval": "90s"}).reconcile_interval.total_seconds() == 90


def test_yaml_errors_name_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("pools:\n  - name: a\n   min_ready: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    text = str(err.value)
    assert text.startswith(f"{path}: not valid YAML: line 3"), text
    assert "<unicode string>" not in text and "\n" not in text


def test_every_mistake_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "reconcile_interval: 5\n"
        "database_url: 'postgresql://u@db:99999/x'\n"
        "pools:\n"
        "  - name: a\n"
        "    min_ready: -1\n"
        "    colour: blue\n"
    )
    done = run("migrate", "--config", str(path))
    assert done.returncode == 2
    lines = one_line_each(done.stderr)
    assert len(lines) == 4, lines
    for line, key in zip(
        lines,
        ["database_url", "reconcile_interval", "pools[0].min_ready", "pools[0].colour"],
        strict=True,
    ):
        assert line.startswith(f"vmpool: bad config: {path}: {key}: "), line
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert "4 mistakes" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "url",
    ["mysql://db/x", "postgresql://db:port/x", "db.example:5432", "postgresql:///x"],
)
def test_a_malformed_database_url_is_a_config_error_at_once(tmp_path: Path, url: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pools: []\n")
    start = time.monotonic()
    done = run("serve", "--config", str(path), env={"VMPOOL_DATABASE_URL": url})
    assert done.returncode == 2, done
    assert time.monotonic() - start < 20, "not retried as if unreachable"
    (line,) = one_line_each(done.stderr)
    assert "VMPOOL_DATABASE_URL" in line, line
    with pytest.raises(ConfigError, match="database_url"):
        parse_config({"database_url": url})


def test_migrate_against_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"database_url: 'postgresql://vmpool@127.0.0.1:{free_port()}/vmpool'\n")
    done = run("migrate", "--config", str(path))
    assert done.returncode == 6, done
    (line,) = one_line_each(done.stderr)
    assert line.startswith("vmpool: cannot migrate: database_url: "), line


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    done = run("serve", "--config", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    (line,) = one_line_each(done.stderr)
    assert "nope.yaml: cannot read" in line
