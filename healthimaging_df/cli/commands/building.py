"""Command-line query options and ID files turned into a ``Query``; raises before anything is sent.

Nothing here prints a DICOM value: messages name columns, files and counts only.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from healthimaging_df import schema
from healthimaging_df.cli.commands.options import UsageError
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.plan import predicates

if TYPE_CHECKING:
    import pandas as pd

    from healthimaging_df.query import Query

log = logging.getLogger("healthimaging_df.cli")

_WHERE = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)\s*(!=|~|=)(.*)", re.DOTALL)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})


def known_column(column: str) -> str:
    """Return *column* if the schema has it; raise ``QueryValidationError`` listing valid names."""
    return predicates.known_column(column).name


def _typed_values(column: str, texts: list[str]) -> Any:
    if len(texts) == 1:
        return typed_value(column, texts[0])
    return [typed_value(column, text, i) for i, text in enumerate(texts)]


def typed_value(column: str, text: str, position: int | None = None) -> Any:
    """Turn command-line *text* into the Python value *column* takes (int, bool or str).

    >>> typed_value("SeriesNumber", "3"), typed_value("isPrimary", "False")
    (3, False)
    """
    col = predicates.column_of(column)  # a schema column or a derived value (ageAtStudy)
    if col.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise QueryValidationError(column, "expects an integer", position) from None
    if col.kind == "bool":
        word = text.strip().lower()
        if word in _TRUE | _FALSE:
            return word in _TRUE
        raise QueryValidationError(column, "expects true or false", position)
    return text


def parse_where(text: str) -> tuple[str, str, str]:
    """Split ``COL=VALUE``, ``COL!=VALUE`` or ``COL~TEXT`` into (column, operator, value).

    >>> parse_where("Modality=CT"), parse_where("StudyDescription~chest")
    (('Modality', '=', 'CT'), ('StudyDescription', '~', 'chest'))
    """
    match = _WHERE.fullmatch(text)
    if match is None:
        raise UsageError("--where expects COL=VALUE, COL!=VALUE or COL~TEXT")
    column, op, value = match.groups()
    column = predicates.column_of(column).name
    if value != value.strip():
        raise UsageError(
            f"--where {column}{op}...: the value has spaces around it, which no stored value "
            f"keeps; write --where {column}{op}VALUE with no spaces around {op!r}"
        )
    return column, op, value


def build_query(args: argparse.Namespace, datastore_id: str) -> Query:
    """The ``Query`` the query options describe; raises before anything is sent."""
    from healthimaging_df.query import Query

    query = Query(datastore_id)
    equal: dict[str, list[Any]] = {}
    unequal: dict[str, list[Any]] = {}
    for text in args.where:
        column, op, value = parse_where(text)
        if op == "~":
            query = query.contains(column, value, case=not args.ignore_case)
            continue
        bucket = equal if op == "=" else unequal
        bucket.setdefault(column, []).append(value)
    for column, texts in equal.items():
        if args.ignore_case and column in predicates.CODE_STRINGS:  # IDs stay exact
            query = query.matches(column, _any_of(texts), case=False)
        else:
            query = query.where(**{column: _typed_values(column, texts)})
    for column, texts in unequal.items():
        query = query.where_not(**{column: _typed_values(column, texts)})
    for column, low, high in args.between:
        query = query.between(column, typed_value(column, low, 0), typed_value(column, high, 1))
    if args.null:
        query = query.is_null(*args.null)
    if args.not_null:
        query = query.not_null(*args.not_null)
    if args.ids_from is not None:
        column = known_column(args.column)
        ids = read_ids(args.ids_from, args.csv_column or column)
        log.info("read %d distinct IDs for %s from --ids-from", len(ids), column)
        query = query.where(**{column: [typed_value(column, v, i) for i, v in enumerate(ids)]})
    if args.sort:
        column, _, order = args.sort.partition(":")
        if order.lower() not in ("", "asc", "desc"):
            raise UsageError("--sort expects COL, COL:asc or COL:desc")
        query = query.sort_by(column, ascending=order.lower() != "desc")
    if args.limit is not None:
        query = query.limit(args.limit)
    if getattr(args, "assume_consistent_studies", False):
        query = query.using(query.strategy, assume_consistent_studies=True)
    return query


def _any_of(texts: list[str]) -> str:
    """A pattern matching exactly one of *texts* (ignoring case is the caller's flag)."""
    for text in texts:
        if text == "":
            raise UsageError("--where: a value is empty (an unset shell variable?)")
    return r"\A(?:" + "|".join(re.escape(t) for t in texts) + r")\Z"


def read_ids(source: str, column: str) -> list[str]:
    """Distinct IDs, in file order, from a CSV/TSV column or a text file (``-`` is stdin)."""
    if source == "-":
        buffer = getattr(sys.stdin, "buffer", None)
        try:  # UTF-8 strictly, as for a file (the text layer may be set to let bad bytes by)
            text = buffer.read().decode("utf-8-sig") if buffer is not None else sys.stdin.read()
        except UnicodeDecodeError:  # its message quotes the bytes it could not decode
            raise UsageError("cannot read --ids-from -: stdin is not UTF-8 text") from None
        suffix = ""
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise UsageError(f"cannot read --ids-from {source}: {reason}") from None
        suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            headers = list(reader.fieldnames or [])
            if column not in headers:
                raise UsageError(_missing_column(source, column, headers))
            values = [(row.get(column) or "").strip() for row in reader]
        except csv.Error:  # its message can quote a cell
            raise UsageError(f"--ids-from {source} is not a well-formed CSV file") from None
    else:
        # Only \n, \r\n and \r end a line: str.splitlines() also splits at U+2028, form
        # feeds and other separators an ID may hold.
        lines = (line.strip() for line in _LINE_BREAK.split(text))
        values = [line for line in lines if not line.startswith("#")]
    ids = list(dict.fromkeys(v for v in values if v))
    if not ids:
        raise UsageError(f"--ids-from {source} holds no IDs")
    return ids


def _missing_column(source: str, column: str, headers: list[str]) -> str:
    """Why *column* is not in a CSV file's *headers*, without quoting the file.

    The first line may be data (a file without a header row) and its cells PHI, so only the
    count of columns is given, and those header cells that are the schema's column names.
    """
    named = [h for h in dict.fromkeys(headers) if h in schema.BY_NAME]
    known = f"; of the schema's column names it has: {', '.join(named)}" if named else ""
    return (
        f"--ids-from {source} has no column {column!r} in its first line ({len(headers)} "
        f"column(s){known}); name the ID column with --csv-column, or give a text file with "
        "one ID per line"
    )


def has_query_options(args: argparse.Namespace) -> bool:
    """Whether any query option other than --datastore-id was given."""
    return bool(
        args.where
        or args.between
        or args.null
        or args.not_null
        or args.ids_from
        or args.sort
        or args.limit
    )


def parse_columns(specs: Sequence[str] | None) -> list[str] | None:
    """``--columns a,b --columns c`` as a list of known column names (None when not given)."""
    if not specs:
        return None
    names = [name.strip() for spec in specs for name in spec.split(",") if name.strip()]
    return list(dict.fromkeys(known_column(name) for name in names))


def cohort_source(
    args: argparse.Namespace, columns: Sequence[str], s3: Any = None
) -> tuple[Any, Callable[[Any], pd.DataFrame]]:
    """Where an enrichment verb's image sets come from: ``(target, cohort)``.

    ``--from FILE`` (which must have *columns*; its provenance names the datastore unless
    ``--datastore-id`` does), or the verb's query options run against the target once connected:
    ``cohort(connection)`` returns the frame either way. Checked before anything is sent.
    """
    from healthimaging_df.aws import quotas
    from healthimaging_df.cli.commands import connect, output
    from healthimaging_df.core.frames import provenance_datastore

    if args.source is None:
        target = connect.Target(args)
        query = build_query(args, target.datastore_id)

        def run(connection: Any) -> pd.DataFrame:
            return query.to_dataframe(
                client=connection.client,
                progress=output.progress(args),
                max_concurrency=args.max_concurrency,
                max_tps=min(args.max_tps, quotas.SEARCH_TPS),
            )

        return target, run
    if has_query_options(args):
        raise UsageError("--from reads image sets from a file: leave out query options")
    frame = output.read_frame(args.source, s3)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UsageError(f"--from {args.source} has no {missing[0]} column")
    target = connect.Target(args, args.datastore_id or provenance_datastore(frame))
    return target, lambda connection: frame
