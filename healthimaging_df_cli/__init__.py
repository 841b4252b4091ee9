"""The ``healthimaging-df`` console script: the command line without an eager pandas import.

Importing this module first tells ``healthimaging_df`` that it runs as the command line, so the
package root skips registering ``df.ahi`` (which imports pandas, most of the start-up time); the
commands import what they use when they run. Library users never import this module.
"""

from __future__ import annotations


def main() -> int:
    """Run the command line (``healthimaging_df.cli.app.main``)."""
    from healthimaging_df.cli.app import main as run

    return run()
