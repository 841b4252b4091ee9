"""Progress for long calls: a tqdm.auto bar, the caller's own callback, or nothing.

``progress=None`` shows a bar only where someone watches (a terminal or a notebook) and never in
CI; ``True`` and ``False`` force it; a callable receives ``(count, other)`` instead of a bar.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Progress = bool | Callable[[int, int], None] | None


@dataclass(eq=False)
class ProgressReporter:
    """Report ``update(count, other)`` to a bar or a callback; ``close()`` when done.

    Parameters
    ----------
    progress
        The caller's choice (see the module docstring).
    desc, unit
        The bar's label and unit.
    total
        The bar's total, when known.
    postfix
        A format string for ``other`` shown after the bar (``"{} image sets"``), if any.
    """

    progress: Progress
    desc: str
    unit: str
    total: int | None = None
    postfix: str | None = None
    _bar: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        shown = self.progress if self.progress is not None else interactive()
        if shown and not callable(shown):
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=self.desc, unit=self.unit, total=self.total, leave=False)

    def update(self, count: int, other: int) -> None:
        """Show that *count* units are done (*other*: the second figure, e.g. image sets)."""
        if callable(self.progress):
            self.progress(count, other)
        elif self._bar is not None:
            self._bar.n = count
            if self.postfix is not None:
                self._bar.set_postfix_str(self.postfix.format(other), refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()


def interactive() -> bool:
    """Whether someone is watching: a notebook kernel or a terminal on stderr, and not CI."""
    if os.environ.get("CI"):
        return False
    return "ipykernel" in sys.modules or sys.stderr.isatty()
