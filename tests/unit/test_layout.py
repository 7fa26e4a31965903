"""The tree is the architecture (docs/architecture.md): checked from the source
with ast, so a change that breaks the layout fails here, not in review."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "vmpool"
GENERATED = ROOT / "proto"
MAX_LINES = 500
#: The top level: the package, the composition root of the server, the
#: reconciler process and the entry point (`python -m vmpool`).
TOP_LEVEL = {"__init__.py", "__main__.py", "app.py", "reconciler_process.py"}
LAZY = "# lazy:"
UNIT = Path(__file__).resolve().parent
#: Unit tests of the whole tree rather than of one module.
WHOLE_TREE_TESTS = {
    "test_layout.py",
    "test_packaging.py",
    "test_performance_doc.py",
    "test_task_guard.py",
}


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if GENERATED not in p.parents)


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports inside a function body (at any depth), not at module level."""
    found: list[ast.Import | ast.ImportFrom] = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            found += [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
    return found


def _targets(node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The vmpool modules an import loads (``from pkg import mod`` is pkg.mod)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if node.level or node.module is None:
        return set()
    out = set()
    for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if full in known:
            out.add(full)
        elif node.module in known:
            out.add(node.module)
    return out


def _graph() -> dict[str, set[str]]:
    paths = {_name(p): p for p in _modules()}
    known = set(paths)
    graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text())
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _targets(node, known)
        graph[name] = edges - {name}
    return graph


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(p.relative_to(ROOT.parent)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these by job (generated code aside): {long}"


def test_function_level_imports_say_why() -> None:
    """Imports belong at the top; one inside a function is for an optional
    dependency or the CLI's start-up time, and its line (or a comment heading
    its block of imports) says which: ``# lazy: reason``."""
    bare = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for node in _function_imports(ast.parse("\n".join(lines))):
            here = lines[node.lineno - 1]
            above = node.lineno - 2  # the comment may head a block of imports
            while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
                above -= 1
            if LAZY not in here and not lines[above].strip().startswith(LAZY):
                bare.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {here.strip()}")
    assert bare == [], "function-level imports without '# lazy: reason':\n" + "\n".join(bare)


def test_every_subpackage_is_a_regular_package() -> None:
    folders = {p.parent for p in ROOT.rglob("*.py")} | {ROOT}
    missing = sorted(str(d) for d in folders if not (d / "__init__.py").exists())
    assert missing == []


def test_the_top_level_holds_only_the_composition_root_and_entry_points() -> None:
    top = {p.name for p in ROOT.glob("*.py")}
    assert top == TOP_LEVEL, f"move {sorted(top - TOP_LEVEL)} into the subpackage it belongs to"


def test_there_are_no_import_cycles_not_even_in_function_bodies() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_unit_tests_mirror_the_layout() -> None:
    """tests/unit/<subpackage>/test_<module>.py: a folder per vmpool subpackage,
    and at the top only the tests of the whole tree."""
    subpackages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    folders = {p.name for p in UNIT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= subpackages, f"no vmpool subpackage for {sorted(folders - subpackages)}"
    top = {p.name for p in UNIT.glob("test_*.py")}
    assert top <= WHOLE_TREE_TESTS, (
        f"move {sorted(top - WHOLE_TREE_TESTS)} to tests/unit/<subpackage>/ (the module's package)"
    )
    missing = sorted(d for d in folders if not (UNIT / d / "__init__.py").exists())
    assert missing == []


def test_the_layers_contract_covers_every_subpackage_and_top_level_module() -> None:
    """A package or module left out of the import-linter layers is unchecked:
    lint-imports would pass whatever it imported."""
    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    contracts = pyproject["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    covered = {name.strip() for layer in layers for name in layer.split("|")}
    tree = {f"vmpool.{p.parent.name}" for p in ROOT.glob("*/__init__.py")}
    tree |= {f"vmpool.{p.stem}" for p in ROOT.glob("*.py") if p.name != "__init__.py"}
    assert len(tree) > 10
    assert tree - covered == set(), "add these to the layers contract in pyproject.toml"


#: Where a PostgreSQL session may be opened: open_connection (each host in turn,
#: keepalives, never a read-only server) and the pool that opens through it.
SESSION_OPENERS = {"vmpool.store.connect": "connect", "vmpool.store.db": "create_pool"}


def test_every_database_session_is_opened_through_open_connection() -> None:
    calls = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "asyncpg"
                and node.func.attr in ("connect", "create_pool")
            ):
                calls.append((_name(path), node.func.attr))
    assert sorted(calls) == sorted(SESSION_OPENERS.items()), (
        "open sessions with vmpool.store.connect.open_connection"
    )


#: A file of this repository named in prose: vmpool/..., tests/... (a ../ prefix allowed).
NAMED_FILE = re.compile(r"(?<![\w/.-])(?:\.\./)*((?:vmpool|tests)/[\w/.-]*\.(?:py|md|sql|go))")


def _named_files() -> dict[str, list[str]]:
    """Files named in the README, docs/, the chart's README, pyproject.toml,
    noxfile.py and the docstrings and comments of vmpool/ and tests/, each with
    where it is named."""
    repo = ROOT.parent
    texts = [repo / n for n in ("README.md", "deploy/helm/vmpool/README.md", "pyproject.toml")]
    texts += [repo / "noxfile.py", *sorted((repo / "docs").glob("*.md")), *_modules()]
    texts += sorted((repo / "tests").rglob("*.py"))
    named: dict[str, list[str]] = {}
    for path in texts:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for target in NAMED_FILE.findall(line):
                named.setdefault(target, []).append(f"{path.relative_to(repo)}:{n}")
    return named


def test_the_docs_name_only_files_that_exist() -> None:
    """A module moved or a test renamed leaves no stale path in the docs."""
    named = _named_files()
    assert len(named) > 30, named  # the pattern finds the paths the docs do name
    stale = {t: where for t, where in named.items() if not (ROOT.parent / t).exists()}
    assert stale == {}, f"named but not in the tree: {stale}"


@pytest.mark.parametrize("rule", ["lines", "lazy", "packages", "top", "cycles"])
def test_the_checks_see_the_tree(rule: str) -> None:
    """Each check above looks at something: the tree is found and parsed."""
    modules = _modules()
    assert len(modules) > 50
    if rule == "lazy":
        assert any(_function_imports(ast.parse(p.read_text())) for p in modules)
    if rule == "cycles":
        assert sum(len(e) for e in _graph().values()) > 100
