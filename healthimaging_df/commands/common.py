"""What the service commands share: AWS options, query options, the client, output files.

Nothing here prints a DICOM value: messages name columns, files and counts only.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from healthimaging_df import predicates, schema
from healthimaging_df.errors import QueryValidationError

if TYPE_CHECKING:
    import pandas as pd

    from healthimaging_df.local import LocalService
    from healthimaging_df.query import Query

log = logging.getLogger("healthimaging_df.cli")

# The synthetic datastore behind --local: the same data as `healthimaging-df demo`.
LOCAL_IMAGE_SETS = 5_000
LOCAL_SEED = 42

SEARCH_TPS = 25.0  # SearchImageSets' default quota, requests per second

Format = Literal["parquet", "csv", "jsonl", "table"]
FORMATS: tuple[Format, ...] = ("parquet", "csv", "jsonl", "table")
_SUFFIXES: dict[str, Format] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
# Columns of the stdout table when --columns is not given (files get every column).
TABLE_COLUMNS = (
    "imageSetId",
    "PatientID",
    "StudyDateTime",
    "Modality",
    "BodyPartExamined",
    "isPrimary",
)

EXIT_STATUS = """\
exit status:
  0  success
  1  service error (HTTP error from HealthImaging, throttled, unreachable endpoint, unknown
     datastore), or a file that could not be written
  2  usage or configuration error (bad option or value, unknown column, unreadable --ids-from
     file, no region or credentials); nothing was sent

Errors are one line on stderr naming the problem, never a DICOM value. Progress goes to stderr
when it is a terminal; results go to stdout or the --out file."""

_WHERE = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)\s*(!=|~|=)(.*)", re.DOTALL)
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})


class UsageError(Exception):
    """A command line or input file the command cannot use (exit code 2); no PHI in the message."""


class ConfigError(UsageError):
    """AWS configuration missing or wrong: profile, region or credentials (exit code 2)."""


# -- argument groups -------------------------------------------------------------------------


def common_parent() -> argparse.ArgumentParser:
    """Options every service command takes: ``-v`` and ``-q``."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log what happens on stderr (no PHI); -vv adds botocore's log, bodies redacted",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bar and no summary line on stderr",
    )
    return parent


def aws_parent() -> argparse.ArgumentParser:
    """The AWS options, spelled as the AWS CLI spells them, and the fetch options."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "AWS",
        "Credentials, region and endpoint come from the usual places unless given here:\n"
        "AWS_PROFILE, AWS_REGION, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_MEDICAL_IMAGING,\n"
        "~/.aws/config, instance roles...",
    )
    group.add_argument("--profile", help="named profile from ~/.aws/config")
    group.add_argument("--region", help="AWS region, e.g. us-east-1")
    group.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="send requests to URL (e.g. a local service); host-prefix injection is turned off",
    )
    group.add_argument(
        "--local",
        action="store_true",
        help=f"ignore AWS: run against the bundled local service, started for this command and "
        f"seeded with the demo's {LOCAL_IMAGE_SETS} synthetic image sets; --datastore-id may be "
        "left out",
    )
    group.add_argument(
        "--max-tps",
        type=_positive_float,
        default=SEARCH_TPS,
        metavar="N",
        help="requests per second, all threads together (default: %(default)s, the service quota)",
    )
    group.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=8,
        metavar="N",
        help="request chains in flight at once (default: %(default)s)",
    )
    return parent


def query_parent() -> argparse.ArgumentParser:
    """The options that state a cohort; ``build_query`` turns them into a ``Query``."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "query",
        "COL is a column name as in the frame (docs/schema.md): PatientID, Modality,\n"
        "StudyDateTime, createdAt... Every condition must hold (AND).",
    )
    group.add_argument(
        "--datastore-id",
        metavar="ID",
        required=False,
        help="the datastore (32 characters); required unless --local",
    )
    group.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COL=VALUE",
        help="COL=VALUE equals (repeat a column for any of several values: IN); "
        "COL!=VALUE differs (rows missing COL are kept); COL~TEXT contains TEXT",
    )
    group.add_argument(
        "--between",
        action="append",
        nargs=3,
        default=[],
        metavar=("COL", "LOW", "HIGH"),
        help="LOW <= COL <= HIGH, inclusive; dates like 2021-01-01 or 2021 cover the whole day/year",
    )
    group.add_argument("--null", action="append", default=[], metavar="COL", help="COL is missing")
    group.add_argument(
        "--not-null", action="append", default=[], metavar="COL", help="COL is present"
    )
    group.add_argument("--ignore-case", action="store_true", help="COL~TEXT conditions ignore case")
    group.add_argument(
        "--ids-from",
        metavar="FILE",
        help="IDs to match, one chain per ID: a .csv/.tsv file (the column named by --csv-column, "
        "else --column) or plain text, one ID per line (blank lines and # comments skipped); "
        "- reads stdin",
    )
    group.add_argument(
        "--column",
        metavar="COL",
        default="PatientID",
        help="the column the --ids-from IDs are matched against (default: %(default)s)",
    )
    group.add_argument(
        "--csv-column",
        metavar="NAME",
        help="header of the ID column in a --ids-from CSV file, when it is not COL",
    )
    group.add_argument(
        "--sort",
        metavar="COL[:desc]",
        help="order by COL, ascending unless :desc (default: updatedAt, newest first)",
    )
    group.add_argument("--limit", type=_positive_int, metavar="N", help="at most N rows")
    return parent


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expects a positive integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("expects a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expects a positive number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("expects a positive number")
    return value


# -- building the query ----------------------------------------------------------------------


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
    col = schema.BY_NAME[known_column(column)]
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
    return known_column(column), op, value


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
    return query


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
        lines = (line.strip() for line in text.splitlines())
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


# -- the service -----------------------------------------------------------------------------


@dataclass
class Connection:
    """A ready ``medical-imaging`` client and the datastore the command works on ("" if unknown)."""

    client: Any
    datastore_id: str


class Target:
    """Where requests go: AWS (profile, region, endpoint) or an in-process local service.

    The datastore is known before connecting, so a query is validated before any set-up.
    """

    def __init__(
        self, args: argparse.Namespace, datastore_id: str | None = None, *, required: bool = True
    ) -> None:
        self.args = args
        self._local: LocalService | None = None
        given = datastore_id or getattr(args, "datastore_id", None)
        if args.local:
            if args.endpoint_url or args.profile:
                raise UsageError("--local runs without AWS: leave out --endpoint-url and --profile")
            from healthimaging_df.local import LocalService

            self._local = LocalService.seeded(image_sets=LOCAL_IMAGE_SETS, seed=LOCAL_SEED)
            given = given or self._local.datastore_id
        if required and not given:
            raise UsageError("--datastore-id is required (or --local to try the bundled service)")
        self.datastore_id: str = given or ""

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """Yield a client; a local service runs for the duration of the ``with`` block."""
        if self._local is not None:
            with self._local as service:
                log.info("local service at %s", service.endpoint_url)
                yield Connection(service.client(), self.datastore_id)
            return
        yield Connection(aws_client(self.args), self.datastore_id)


def aws_client(args: argparse.Namespace) -> Any:
    """A ``medical-imaging`` client from --profile, --region and --endpoint-url (or the env)."""
    import boto3
    from botocore.exceptions import NoRegionError, ProfileNotFound

    from healthimaging_df.aws import make_client

    try:
        session = boto3.Session(profile_name=args.profile, region_name=args.region)
    except ProfileNotFound:
        raise ConfigError("the profile given by --profile or AWS_PROFILE does not exist") from None
    try:
        client = make_client(None, session, args.max_concurrency, endpoint_url=args.endpoint_url)
    except NoRegionError:
        raise ConfigError("no AWS region: pass --region or set AWS_REGION") from None
    except ValueError:
        raise ConfigError("--endpoint-url is not a valid URL") from None
    if session.get_credentials() is None:
        raise ConfigError(
            "no AWS credentials: pass --profile, or set AWS_PROFILE or AWS_ACCESS_KEY_ID"
        )
    log.info(
        "client: region %s, endpoint %s",
        client.meta.region_name,
        client.meta.endpoint_url,
    )
    return client


def progress(args: argparse.Namespace) -> bool:
    """Show a progress bar: only when stderr is a terminal and not --quiet."""
    return sys.stderr.isatty() and not getattr(args, "quiet", False)


def status(args: argparse.Namespace, message: str) -> None:
    """A summary line on stderr (counts and paths only), unless --quiet."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


# -- output ------------------------------------------------------------------------------------


def output_format(out: str | None, given: str | None) -> Format:
    """The format to write: --format, else the --out extension, else a table on stdout."""
    if given is not None:
        fmt: Format = given  # type: ignore[assignment]
        if fmt == "parquet" and out in (None, "-"):
            raise UsageError("Parquet goes to a file: give --out FILE.parquet")
        if fmt == "table" and out not in (None, "-"):
            raise UsageError("--format table prints to stdout; leave out --out")
        return fmt
    if out in (None, "-"):
        return "table"
    suffix = Path(out).suffix.lower()
    if suffix not in _SUFFIXES:
        raise UsageError(
            f"cannot tell the format of --out from {suffix or 'no extension'!r}: use .parquet, "
            ".csv, .jsonl (or .ndjson), or --format"
        )
    return _SUFFIXES[suffix]


def read_frame(source: str) -> pd.DataFrame:
    """Image sets from a file ``search`` or ``snapshot`` wrote: Parquet, CSV or JSON Lines.

    Parquet (a file or a directory) keeps its dtypes and provenance; text files are read as text.
    """
    import pandas as pd

    path = Path(source)
    if not path.exists():
        raise UsageError(f"no such file: {source}")
    fmt = output_format(source, None) if path.is_file() else "parquet"
    if fmt == "parquet":
        from healthimaging_df.errors import SnapshotError
        from healthimaging_df.snapshot import read_snapshot

        try:
            return read_snapshot(path)
        except SnapshotError:  # a Parquet file some other tool wrote
            return pd.read_parquet(path)
    if fmt == "csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    else:
        frame = pd.read_json(path, lines=True, dtype=False)
    if "version" in frame.columns:
        frame["version"] = pd.to_numeric(frame["version"]).astype("Int64")
    return frame


def write_frame(frame: pd.DataFrame, out: str | None, fmt: Format) -> None:
    """Write *frame* to *out*, or to stdout when *out* is None or ``-``.

    Parquet is written as a snapshot (typed, with provenance, refreshable); CSV and JSON Lines go
    to a temporary file renamed over *out*, so a reader never sees half a file. Missing parent
    directories are created.
    """
    if out in (None, "-"):
        _write(frame, sys.stdout, fmt)
        return
    assert out is not None
    if fmt == "parquet":  # a snapshot: typed, with provenance, refreshable, written atomically
        from healthimaging_df.snapshot import write_snapshot

        write_snapshot(frame, out)
        return
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)  # as snapshots do
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            _write(frame, handle, fmt)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _write(frame: pd.DataFrame, handle: Any, fmt: Format) -> None:
    if fmt == "csv":
        frame.to_csv(handle, index=False)
    elif fmt == "jsonl":
        if len(frame):
            frame.to_json(handle, orient="records", lines=True, date_format="iso", date_unit="us")
    elif fmt == "table":
        if len(frame):
            handle.write(frame.to_string(index=False) + "\n")
    else:  # pragma: no cover - output_format keeps Parquet off stdout
        raise UsageError("Parquet goes to a file: give --out FILE.parquet")
