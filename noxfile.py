"""Developer tasks: `nox -s tests`, `lint`, `typecheck`, `protos`, `serve`, `bench`, `chaos`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def protos(session: nox.Session) -> None:
    """Regenerate the betterproto code under vmpool/proto from api/ (vmpool/wire/protogen.py)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "vmpool.wire.protogen", "vmpool/proto")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, integration (real PostgreSQL), chart and end-to-end tests."""
    session.install("-e", ".[test,dev]")
    session.run("pytest", *(session.posargs or ["-q", "-p", "no:cacheprovider"]))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6", "import-linter==2.16")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")  # layer contracts in pyproject.toml


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev,test]")
    session.run("mypy")


@nox.session
def serve(session: nox.Session) -> None:
    """Run the demo server (embedded PostgreSQL, fake provider)."""
    session.install("-e", ".")
    session.run("vmpool", "serve", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the physical limits; `-- --quick` for a short run."""
    session.install("-e", ".[bench,test]")
    session.run("python", "-m", "tests.bench", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """Chaos scenarios with an invariant check; `-- --long` for longer runs."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.chaos", *session.posargs)


@nox.session(python=False)
def e2e_kind(session: nox.Session) -> None:
    """End to end on a real kind cluster with KubeVirt (needs Docker; not on CI)."""
    session.run("bash", "deploy/kind/e2e.sh", *session.posargs, external=True)
