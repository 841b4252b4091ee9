"""``python -m bench [NAME ...]``: run benchmark modules and update docs/benchmarks.md.

``python -m bench NAME --option ...`` hands the options to that one benchmark (``--no-write``,
``--image-sets``, ...); before, they were taken for benchmark names and the bench ran with none.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main() -> int:
    names = sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.endswith("_bench")
    )
    arguments = sys.argv[1:]
    options = next((i for i, a in enumerate(arguments) if a.startswith("-")), len(arguments))
    chosen, passed = arguments[:options] or names, arguments[options:]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(
            f"no such benchmark: {', '.join(unknown)} (have: {', '.join(names)})", file=sys.stderr
        )
        return 2
    if passed and len(chosen) != 1:
        print("options go to one benchmark: python -m bench NAME [options]", file=sys.stderr)
        return 2
    for name in chosen:
        print(f"== {name}", flush=True)
        sys.argv = [f"bench/{name}.py", *passed]  # each bench parses its own options
        importlib.import_module(f"bench.{name}").main()
    return 0


raise SystemExit(main())
