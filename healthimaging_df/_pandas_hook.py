"""Register ``df.ahi`` the moment pandas is imported, so ``import healthimaging_df`` stays cheap.

A finder on ``sys.meta_path`` watches for the ``pandas`` module only: it lets the usual finders
locate it, and wraps its loader so that, once pandas has fully loaded, our accessor module is
imported (which registers ``df.ahi``). The finder removes itself after that one import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        import healthimaging_df.accessor  # noqa: F401  (registers df.ahi)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package...
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "pandas":
            return None
        _unregister()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def _unregister() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def register_accessor_with_pandas() -> None:
    """Import ``healthimaging_df.accessor`` right after pandas loads (now if it already has)."""
    if "pandas" in sys.modules:
        import healthimaging_df.accessor  # noqa: F401

        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
