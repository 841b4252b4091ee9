"""``python -m bench``: run every benchmark module and update docs/benchmarks.md."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main() -> int:
    names = sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.endswith("_bench")
    )
    chosen = sys.argv[1:] or names
    for name in chosen:
        print(f"== {name}", flush=True)
        sys.argv = [f"bench/{name}.py"]  # each bench parses its own options, none given here
        importlib.import_module(f"bench.{name}").main()
    return 0


raise SystemExit(main())
