"""Polars: a lazy frame over a datastore whose filters become requests, and SQL on it.

``scan_image_sets(ds)`` is a Polars IO source (``polars.io.plugins.register_io_source``). When the
frame is collected, Polars hands the source the filter it wrote after the scan (the predicate),
the columns it needs and, for a bare ``head(n)``, a row count. The source translates the
predicate, conjunct by conjunct, into ``Query`` conditions, which the planner turns into requests
(an ID to fan out on, a date range, QIDO-RS...), runs the query, and applies the **whole**
predicate again to every batch with Polars itself: Polars does not filter what a source returns
(measured in every version 1.4 to 2.1), and a translated condition need only hold for a
superset. What cannot be translated is still applied exactly, by the source; the log (INFO) and
:func:`explain` name each conjunct that was not pushed, by its shape, never its values.

Supported: ``polars>=1.26,<3`` (the ``polars`` extra; older versions lose or misplace filters).
The serialised expression format is unstable across versions, so only its structure is read;
every column-free part (a literal, a list, a date Polars parses) is evaluated by Polars itself.
Anything unknown is not pushed, and the result stays exact.

``sql("SELECT ... FROM image_sets WHERE ...", datastore_id=...)`` runs Polars SQL over the scan:
its WHERE becomes the predicate above (GROUP BY, aggregates and ORDER BY run in Polars).
"""

from __future__ import annotations

try:
    import polars as pl  # noqa: F401  # the extra's check, before the machinery imports it
    from polars.io.plugins import register_io_source  # noqa: F401
except ImportError:  # pragma: no cover - the extra is part of the test install
    raise ImportError(
        'healthimaging_df.polars needs polars, an optional extra: pip install "healthimaging-df[polars]"'
    ) from None

from healthimaging_df._polars.source import (
    DEFAULT_BATCH_ROWS,
    explain,
    polars_schema,
    scan_image_sets,
)
from healthimaging_df._polars.source import Source as _Source  # noqa: F401  # pickled frames
from healthimaging_df._polars.sql import PolarsSQLError, collect_sql, sql, sql_frame
from healthimaging_df._polars.translate import Translation, translate

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "PolarsSQLError",
    "Translation",
    "collect_sql",
    "explain",
    "polars_schema",
    "scan_image_sets",
    "sql",
    "sql_frame",
    "translate",
]
