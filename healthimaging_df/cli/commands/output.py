"""What a command writes: the format, the file (or stdout, or S3), progress and the summary line.

``--out`` and ``--from`` take local paths or ``s3://bucket/key`` URLs (``remote``): every format
goes to S3 as it would go to a file, streamed outputs included. Nothing here prints a DICOM value:
messages name columns, files and counts only.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from healthimaging_df.cli.commands import remote
from healthimaging_df.cli.commands.options import UsageError
from healthimaging_df.cli.commands.remote import S3Settings

if TYPE_CHECKING:
    import pandas as pd

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


def progress(args: argparse.Namespace) -> bool:
    """Show a progress bar: only when stderr is a terminal and not --quiet."""
    return sys.stderr.isatty() and not getattr(args, "quiet", False)


def status(args: argparse.Namespace, message: str) -> None:
    """A summary line on stderr (counts and paths only), unless --quiet."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def written(args: argparse.Namespace, what: str) -> None:
    """The summary line of a verb that wrote its result: *what* (counts only) -> where it went."""
    where = args.out if args.out not in (None, "-") else "stdout"
    status(args, f"{what} -> {where}")


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
    assert out is not None
    suffix = _suffix(out)
    if suffix not in _SUFFIXES:
        raise UsageError(
            f"cannot tell the format of --out from {suffix or 'no extension'!r}: use .parquet, "
            ".csv, .jsonl (or .ndjson), or --format"
        )
    return _SUFFIXES[suffix]


def _suffix(path: str) -> str:
    """The extension of a local path or of an ``s3://`` URL's key, lower-cased."""
    if remote.is_s3(path):
        return PurePosixPath(urlsplit(path).path).suffix.lower()
    return Path(path).suffix.lower()


def add_s3_options(group: Any) -> None:
    """``--s3-endpoint-url`` and ``--kms-key-id``, for commands whose ``--out``/``--from`` take s3://."""
    group.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        help="S3-compatible endpoint for s3:// paths (default: AWS_ENDPOINT_URL_S3, else AWS); "
        "S3 uses the same --profile and --region",
    )
    group.add_argument(
        "--kms-key-id", metavar="KEY", help="SSE-KMS key (ID, alias or ARN) for an s3:// --out"
    )


def s3_settings(args: argparse.Namespace) -> S3Settings:
    """How the command reaches S3: its --profile, --region, --s3-endpoint-url, --kms-key-id."""
    return S3Settings.from_args(args)


def add_out(group: Any, help_: str) -> None:
    """``--out`` (helped by *help_*), ``--format`` and ``--mkdir``: where a command writes."""
    group.add_argument("--out", metavar="FILE", help=help_)
    group.add_argument("--format", choices=FORMATS, help="override the --out extension")
    add_mkdir(group)


def add_mkdir(group: Any) -> None:
    """The ``--mkdir`` option, for commands with ``--out``."""
    group.add_argument(
        "--mkdir",
        action="store_true",
        help="create the --out file's missing parent directories (refused otherwise)",
    )


def destination(args: argparse.Namespace) -> Format:
    """The format of the command's ``--out`` (or ``--format``), its directory checked first."""
    fmt = output_format(args.out, args.format)
    check_destination(args.out, args.mkdir)
    return fmt


def check_destination(out: str | None, mkdir: bool) -> None:
    """Refuse, before any request, an --out whose directory does not exist (unless --mkdir).

    An ``s3://`` --out needs a bucket and a key; S3 has no directories to create.
    """
    if remote.is_s3(out):
        assert out is not None
        remote.split(out)
        return
    if out in (None, "-") or mkdir:
        return
    assert out is not None
    parent = Path(out).parent
    if not parent.is_dir():
        raise UsageError(
            f"--out {out}: the directory {parent} does not exist; create it, or pass --mkdir"
        )


def read_frame(source: str, s3: S3Settings | None = None) -> pd.DataFrame:
    """Image sets from a file ``search`` or ``snapshot`` wrote: Parquet, CSV or JSON Lines.

    Parquet (a file or a directory) keeps its dtypes and provenance; text files are read as text.
    *source* may be an ``s3://`` URL, read with *s3* (default: the default session).
    """
    import pandas as pd

    if remote.is_s3(source):
        return _read_s3(source, s3 or S3Settings())
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
    return _read_text(path, fmt)


def _read_text(source: Any, fmt: Format) -> pd.DataFrame:
    import pandas as pd

    if fmt == "csv":
        frame = pd.read_csv(source, dtype=str, keep_default_na=False, na_values=[""])
    else:
        frame = pd.read_json(source, lines=True, dtype=False)
    if "version" in frame.columns:
        frame["version"] = pd.to_numeric(frame["version"]).astype("Int64")
    return frame


def _read_s3(source: str, s3: S3Settings) -> pd.DataFrame:
    """An ``s3://`` object (.csv, .jsonl, .parquet) or snapshot directory (any other name)."""
    import pandas as pd

    from healthimaging_df.errors import SnapshotError
    from healthimaging_df.snapshot import read_snapshot

    fmt = _SUFFIXES.get(_suffix(source))
    if fmt in ("csv", "jsonl"):
        return _read_text(io.BytesIO(remote.get(source, s3)), fmt)
    if fmt is None:  # a snapshot directory (its errors name no path inside it)
        whole: pd.DataFrame = read_snapshot(source, **s3.snapshot_options())
        return whole
    try:
        single: pd.DataFrame = read_snapshot(source, **s3.snapshot_options())
        return single
    except (SnapshotError, OSError):  # not there (said below), or Parquet some other tool wrote
        return pd.read_parquet(io.BytesIO(remote.get(source, s3)))


def stream_frames(
    frames: Iterable[pd.DataFrame],
    out: str | None,
    fmt: Format,
    columns: Sequence[str] | None = None,
    s3: S3Settings | None = None,
) -> int:
    """Write CSV or JSON Lines chunk by chunk as *frames* arrive; return the rows written.

    To stdout each chunk is flushed at once, so ``| head`` sees rows early and a closed pipe
    stops the fetch; to a file, the chunks go to a temporary file renamed over *out* at the end;
    to ``s3://``, into a multipart upload opened first and completed at the end (``remote``).
    A CSV file gets its header even when nothing matched.
    """
    rows = 0
    header = True  # a CSV header, once (an empty result still yields one empty frame)
    with _destination(out, s3) as handle:
        try:
            for frame in frames:
                chosen = frame[list(columns)] if columns is not None else frame
                if fmt == "csv" and (header or len(chosen)):
                    chosen.to_csv(handle, index=False, header=header)
                    header = False
                elif fmt == "jsonl" and len(chosen):
                    _write(chosen, handle, "jsonl")
                handle.flush()
                rows += len(chosen)
        finally:
            close = getattr(frames, "close", None)
            if close is not None:  # stop the fetch behind the generator at once
                close()
    return rows


@contextmanager
def _destination(out: str | None, s3: S3Settings | None = None) -> Iterator[IO[str]]:
    """stdout, a file or an S3 object that appears only once everything is written.

    A local *out* is a temporary file next to it, renamed over it at the end; an ``s3://`` one is
    a multipart upload, completed at the end and aborted on failure.
    """
    if out in (None, "-"):
        yield sys.stdout
        return
    assert out is not None
    if remote.is_s3(out):
        with remote.upload_text(out, s3 or S3Settings()) as handle:
            yield handle
        return
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            yield handle
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_frame(
    frame: pd.DataFrame,
    out: str | None,
    fmt: Format,
    *,
    plain: bool = False,
    s3: S3Settings | None = None,
) -> None:
    """Write *frame* to *out*, or to stdout when *out* is None or ``-``.

    Parquet is written as a snapshot (typed, with provenance, refreshable), or, when *plain*
    (a rollup, which is no image-set frame), as a plain Parquet file; CSV and JSON Lines go to a
    temporary file renamed over *out*, so a reader never sees half a file. Missing parent
    directories are created (``check_destination`` refused them earlier unless ``--mkdir``).
    An ``s3://`` *out* is written with *s3* (default: the default session), whole or not at all.
    """
    if fmt == "parquet" and out not in (None, "-"):
        assert out is not None
        settings = s3 or S3Settings()
        from healthimaging_df.snapshot import write_snapshot

        # a snapshot (typed, with provenance, written atomically); a rollup (*plain*) too, with
        # no provenance (the query's values are PHI): pandas and read_snapshot read both
        extra: dict[str, Any] = {"provenance": {"rollup": True}} if plain else {}
        if remote.is_s3(out):
            write_snapshot(
                frame, out, kms_key_id=settings.kms_key_id, **settings.snapshot_options(), **extra
            )
        else:
            write_snapshot(frame, out, **extra)
        return
    with _destination(out, s3) as handle:
        _write(frame, handle, fmt)


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
