"""Import layering as a tested rule: no import cycle inside the library (`tvkd/`).

The import graph is read from the source with `ast`, every import included (also those inside
functions, which is where cycles hide: `tvkd.trainer` and `tvkd.evaluate` imported each other
that way). `from tvkd import x` counts as an import of the module `tvkd.x` (and of `tvkd`).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(package: str) -> dict[str, Path]:
    """Dotted module name → file, for every module of `package` (a folder under the root)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "tvkd.data.load_pairs" → "tvkd.data"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    modules = module_names(package)
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph("tvkd")
    assert "tvkd.precompute" in graph["tvkd.pipeline"]  # imported inside `precompute()` only
    assert "tvkd.models" in graph["tvkd.cli.models"]  # `from tvkd import models as M`


def test_no_import_cycle_inside_tvkd() -> None:
    found = cycles(import_graph("tvkd"))
    assert found == [], f"import cycles inside tvkd/: {found}"


# -------------------------------------------------------------------------------------------------
# The layers of the whole project: worker → service → tvkd; the dashboard talks HTTP only; the CLI
# (tvkd/cli) is the one composition root that may reach the service and the workers.

PACKAGES = ("tvkd", "service", "worker", "dashboard")
COMPOSITION_ROOT = "tvkd.cli"
# Layer → the layers it may import.
MAY_IMPORT = {
    "tvkd": {"tvkd"},
    "service": {"service", "tvkd"},
    "worker": {"worker", "service", "tvkd"},
    "dashboard": {"dashboard"},
    "cli": {"cli", "tvkd", "service", "worker"},
}
# Web, queue and database libraries the library proper (tvkd/ outside the CLI) must not import.
NOT_IN_LIBRARY = frozenset(
    {"fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "celery", "kombu", "redis", "psycopg",
     "streamlit", "httpx", "pydantic_settings"}
)  # fmt: skip


def layer(module: str) -> str:
    if module == COMPOSITION_ROOT or module.startswith(COMPOSITION_ROOT + "."):
        return "cli"
    return module.split(".")[0]


def project_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        modules.update(module_names(package))
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def external_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports of a file, anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def forbidden_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (src, dst)
        for src, targets in graph.items()
        for dst in targets
        if layer(dst) not in MAY_IMPORT[layer(src)]
    )


def test_the_layer_rule_catches_a_wrong_edge() -> None:
    graph = {"service.x": {"worker.y"}, "worker.y": {"service.x"}, "tvkd.cli.z": {"worker.y"}}
    assert forbidden_edges(graph) == [("service.x", "worker.y")]
    assert cycles(graph) == [["service.x", "worker.y"]]


def test_the_project_graph_sees_every_package_and_lazy_imports() -> None:
    graph = project_graph()
    assert {layer(m) for m in graph} == set(MAY_IMPORT)
    assert "worker.tasks" in graph["worker.celery_app"]  # imported inside the task body only
    assert "service.queue" in graph["service.routers.jobs"]  # imported on the first publish


def test_imports_follow_the_layers() -> None:
    """worker → service → tvkd; the dashboard imports no project package; only the CLI (the
    composition root) reaches the service and the workers."""
    bad = forbidden_edges(project_graph())
    assert bad == [], f"imports against the layering (worker → service → tvkd, dashboard HTTP only): {bad}"


def test_no_import_cycle_in_the_project() -> None:
    found = cycles(project_graph())
    assert found == [], f"import cycles: {found}"


def test_the_library_imports_no_web_queue_or_database_code() -> None:
    offenders = {
        name: sorted(external_imports(path) & NOT_IN_LIBRARY)
        for name, path in module_names("tvkd").items()
        if layer(name) == "tvkd" and external_imports(path) & NOT_IN_LIBRARY
    }
    assert offenders == {}, offenders
