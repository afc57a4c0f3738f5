"""The import rules of the house (README "Layout"): which package may import which, no module-level import
cycles, and no source file much over 500 lines. Read from the source with ``ast``, so imports inside functions
count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "demo", "flows", "storage", "review", "cli", "templates")
# package -> what it must never import (project packages and third-party frameworks)
FORBIDDEN = {
    "engine": {"flows", "storage", "cli", "review", "demo", "prefect", "sqlalchemy", "fastapi", "diffusers"},
    "demo": {"flows", "storage", "cli", "review", "prefect", "sqlalchemy"},
    "storage": {"engine", "flows", "cli", "review", "demo", "prefect"},
    "flows": {"review", "cli", "demo"},
    "review": {"engine", "cli", "demo", "prefect"},
}
# review/ reaches flows/ only to submit runs (and Prefect only through flows.deployment_runs).
MAX_LINES = 500


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts or package != "storage")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = _module(path).split(".")
            base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_house_allows(package: str) -> None:
    wrong = []
    for path in _sources(package):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_module_level_import_cycles() -> None:
    modules = {_module(p): p for package in PACKAGES for p in _sources(package)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {target for target in _imports(path, module_level_only=True) if target in modules and target != name}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_source_file_is_much_over_500_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {n}" for package in (*PACKAGES, "bench") for p in _sources(package)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, "\n".join(long)
