"""The local package stays self-contained and its modules form no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import healthimaging_df.local as local_package
from healthimaging_df.local import backend

PACKAGE = Path(local_package.__file__).parent


def _local_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("healthimaging_df")}


def test_imports_nothing_else_from_the_package_and_no_cycle() -> None:
    graph = {p.stem: _local_imports(p) for p in PACKAGE.glob("*.py")}
    for module, imports in graph.items():
        outside = {n for n in imports if not n.startswith("healthimaging_df.local")}
        assert outside == set(), module
    edges = {
        m: {n.rsplit(".", 1)[-1] for n in imports if n != "healthimaging_df.local"}
        for m, imports in graph.items()
        if m != "__init__"
    }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for target in edges.get(module, ()):
            visit(target, (*path, module))
        done.add(module)

    for module in edges:
        visit(module, ())
    assert len(edges) >= 10  # the split modules are all seen


def test_backend_keeps_its_public_names() -> None:
    for name in backend.__all__:
        assert hasattr(backend, name), name
    assert {"Backend", "study_datetime", "parse_timestamp", "gzip_document"} <= set(backend.__all__)
