"""Imports follow the data: no cycle anywhere in the package, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import healthimaging_df

PACKAGE = Path(healthimaging_df.__file__).parent
NAME = "healthimaging_df"


def module_name(path: Path) -> str:
    parts = [NAME, *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(path: Path, modules: set[str]) -> set[str]:
    """Package modules *path* imports anywhere (in functions too), TYPE_CHECKING blocks aside."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    targets = set()
    for name in found:
        # a module, or the package that holds it (importing a package runs its __init__)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != here:
            targets.add(name)
    return targets


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    edges = {module_name(p): imported(p, modules) for p in paths}
    # importing a.b runs a/__init__ first, but a/__init__ importing a.b is not a way back up
    for source, targets in edges.items():
        targets.discard(NAME)
        edges[source] = {t for t in targets if not source.startswith(f"{t}.")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_the_walker_sees_function_local_imports() -> None:
    edges = graph()
    # query.py imports the engine at the top; engine's own imports are found too
    assert "healthimaging_df.engine" in edges["healthimaging_df.query"]
    assert "healthimaging_df.fetch" in edges["healthimaging_df.engine"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package() -> None:
    assert cycles(graph()) == []


def test_the_local_service_imports_nothing_else_of_the_package() -> None:
    edges = graph()
    local = {m for m in edges if m.startswith(f"{NAME}.local")}
    for module in local:
        outside = {t for t in edges[module] if t not in local}
        assert outside == set(), module


def test_lower_layers_never_import_the_builder() -> None:
    edges = graph()
    lower = ["plan", "fetch", "frame", "engine", "checkpoint", "provenance", "snapshot", "aws"]
    for name in lower:
        assert f"{NAME}.query" not in edges[f"{NAME}.{name}"], name
