"""Imports follow the data: ``plot`` draws what ``cohort`` computes, so cohort never imports plot."""

from __future__ import annotations

import ast
from pathlib import Path

import healthimaging_df

PACKAGE = Path(healthimaging_df.__file__).parent


def imported(module: str) -> set[str]:
    """Every healthimaging_df module *module* imports, function-local ones included."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # typing-only imports are not imports at run time
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = [ast.Pass()]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name.startswith("healthimaging_df.")}


def test_cohort_and_plot_import_no_cycle() -> None:
    assert "healthimaging_df.plot" not in imported("cohort")
    assert not any(name.startswith("healthimaging_df.accessor") for name in imported("plot"))
