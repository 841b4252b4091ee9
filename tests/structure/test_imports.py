"""Imports follow the data: layers by package, no cycle anywhere, the package root included.

Every import of the package is walked (function-local ones too; ``TYPE_CHECKING`` blocks aside).
``from healthimaging_df import x`` is an edge to the submodule ``x`` when ``x`` is one, and an edge
to the package root otherwise (``__version__``, ``Query``...): the root runs ``accessor`` on
import, so a lower layer that takes a name from it closes a circle through the whole package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import healthimaging_df

PACKAGE = Path(healthimaging_df.__file__).parent
NAME = "healthimaging_df"

# The layers of docs/architecture.md, bottom first. A module may import its own layer's modules
# and any layer below; never one above. The root's public faces sit above the engine.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "errors", "schema", "core"),
    ("plan",),
    ("aws",),
    ("dicomweb", "store"),
    ("engine",),
    (
        "query",
        "snapshot",
        "metadata",
        "redact",
        "cohort",
        "plot",
        "polars",
        "_polars",
        "checkup",
        "conformance",
        "options",
    ),
    ("refresh", "sync"),
    ("accessor",),
    ("cli", "__main__", NAME),
)
LOCAL = f"{NAME}.local"


def module_name(path: Path) -> str:
    parts = [NAME, *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(path: Path, modules: set[str], here: str | None = None) -> set[str]:
    """Package modules *path* imports anywhere (in functions too), TYPE_CHECKING blocks aside."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = here or module_name(path)
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
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
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
        edges[source] = {t for t in targets if not source.startswith(f"{t}.") or t == NAME}
    return edges


def layer(module: str) -> int:
    """The layer of *module*: that of its top-level name under the package root."""
    top = NAME if module == NAME else module.split(".")[1]
    for index, names in enumerate(LAYERS):
        if top in names or (top == NAME and NAME in names):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


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


def test_the_walker_sees_function_local_imports_and_root_names() -> None:
    edges = graph()
    # query.py imports the engine at the top; engine's own imports are found too
    assert f"{NAME}.engine" in edges[f"{NAME}.query"]
    assert f"{NAME}.engine.fetch" in edges[f"{NAME}.engine.run"]
    # the root's own imports count: it registers the accessor
    assert f"{NAME}.accessor" in edges[NAME]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_root_name_is_an_edge_to_the_root(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from healthimaging_df import __version__, schema\n")
    modules = {NAME, f"{NAME}.schema", f"{NAME}.x"}
    assert imported(source, modules, f"{NAME}.x") == {NAME, f"{NAME}.schema"}


def test_no_import_cycle_in_the_package_root_included() -> None:
    assert cycles(graph()) == []


def test_every_module_imports_only_its_layer_and_below() -> None:
    edges = graph()
    wrong = []
    for source, targets in sorted(edges.items()):
        if source.startswith(LOCAL):
            continue
        for target in sorted(targets):
            if target.startswith(LOCAL):  # the CLI's `local serve` and the demo start it
                if layer(source) < layer(f"{NAME}.cli"):
                    wrong.append(f"{source} -> {target}")
            elif layer(target) > layer(source):
                wrong.append(f"{source} -> {target}")
    assert wrong == []


def test_the_local_service_imports_nothing_else_of_the_package() -> None:
    edges = graph()
    local = {m for m in edges if m.startswith(LOCAL)}
    for module in local:
        outside = {t for t in edges[module] if t not in local}
        assert outside == set(), module
