"""Database URLs an operator copies from the docs verify the server and load.

`sslmode=require` encrypts but accepts any certificate (docs/security.md, "The
database connection"): every URL that sets an sslmode sets verify-full with
the CA in sslrootcert, and the loader and asyncpg take it as written.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import asyncpg
import pytest

from vmpool.config.database import check_database_url
from vmpool.config.loading import load_config

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "deploy" / "helm" / "vmpool"
SOURCES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    CHART / "README.md",
    CHART / "values.yaml",
    CHART / "templates" / "NOTES.txt",
]
URL = re.compile(r"postgres(?:ql)?://[^\s'\"`)<>]*(?:<[^>\s]*>[^\s'\"`)<>]*)*")
VERIFIED = "postgresql://vmpool:PASSWORD@db.example:5432/vmpool?sslmode=verify-full&sslrootcert=/etc/vmpool/database-ca/ca.crt"


def _documented_urls() -> list[tuple[str, str]]:
    return [
        (path.relative_to(REPO).as_posix(), url.rstrip(".,;:"))
        for path in SOURCES
        for url in URL.findall(path.read_text())
        if not url.endswith("://")  # the scheme named in prose
    ]


def test_every_documented_url_with_an_sslmode_verifies_the_server() -> None:
    urls = _documented_urls()
    verified = []
    for where, url in urls:
        assert check_database_url(url) == url, (where, url)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        if "sslmode" in query:
            assert query["sslmode"] == ["verify-full"], (where, url)
            assert query.get("sslrootcert"), (where, url)
            verified.append(where)
    # The install steps (a URL, then the Secret holding it) show one each.
    assert verified.count("docs/operations.md") >= 2
    assert "deploy/helm/vmpool/README.md" in verified
    assert "docs/security.md" in verified


def test_the_loader_takes_a_verify_full_url_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("log_level: info\n")
    config = load_config(path, {"VMPOOL_DATABASE_URL": VERIFIED})
    assert config.database_url == VERIFIED


async def test_asyncpg_reads_sslrootcert_from_the_url(tmp_path: Path) -> None:
    # The CA file is loaded before any connection is attempted: a URL naming
    # a missing one fails on the file, so the parameter is not ignored.
    missing = tmp_path / "no-such-ca.crt"
    url = VERIFIED.replace("/etc/vmpool/database-ca/ca.crt", str(missing)).replace(
        "db.example:5432", "127.0.0.1:9"
    )
    with pytest.raises(FileNotFoundError):
        await asyncpg.connect(url, timeout=2)
