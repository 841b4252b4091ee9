"""The ``healthimaging-df`` command line: ``main`` parses, ``commands/`` holds one module per verb."""

from __future__ import annotations

from healthimaging_df.cli.app import main

__all__ = ["main"]
