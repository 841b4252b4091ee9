"""Datasets whose file names say nothing: pyarrow's errors then quote no partition value.

A table partitioned by ``PatientID`` keeps its files under ``PatientID=<value>/``, and pyarrow
puts a file's path in its error when the file is damaged (``Could not open Parquet input source
'PatientID=.../part-...parquet'``): PHI in an exception raised where we cannot catch it, from a
dataset the caller scans (``scan_snapshot(...).to_table()``). So the datasets handed out are over
a file system that names each data file ``part-<n>.parquet`` and maps it to the real path; the
partition values travel as the fragments' partition expressions, not in the names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pyarrow import fs as pafs

from healthimaging_df.store.errors import translated

_ACTION = "scanning the snapshot"


class _Handler(pafs.FileSystemHandler):  # type: ignore[misc]
    """Read-only: opaque names to the real paths of another file system."""

    def __init__(self, base: Any, names: dict[str, str]) -> None:
        self.base = base
        self.names = names

    def _real(self, path: str) -> str:
        try:
            return self.names[path.lstrip("/")]
        except KeyError:
            raise FileNotFoundError("no such data file in the snapshot") from None

    def get_type_name(self) -> str:
        return "healthimaging_df-snapshot"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other: Any) -> bool:
        return self is other

    def get_file_info(self, paths: Sequence[str]) -> list[pafs.FileInfo]:
        infos = []
        for path in paths:
            real = self.base.get_file_info(self._real(path))
            infos.append(pafs.FileInfo(path, real.type, size=real.size, mtime=real.mtime))
        return infos

    def get_file_info_selector(self, selector: Any) -> list[pafs.FileInfo]:
        return self.get_file_info(sorted(self.names))

    def open_input_file(self, path: str) -> Any:
        return self.base.open_input_file(self._real(path))

    def open_input_stream(self, path: str) -> Any:
        return self.base.open_input_stream(self._real(path))

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError("a snapshot's dataset is read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


class SnapshotDataset(pads.FileSystemDataset):  # type: ignore[misc]
    """A ``FileSystemDataset`` whose reading methods raise ``SnapshotError`` (no path, no value).

    Anything that scans it another way (a ``Scanner``, DuckDB, Polars) sees pyarrow's errors,
    which name only the opaque ``part-<n>.parquet``.
    """

    def to_table(self, *args: Any, **kwargs: Any) -> pa.Table:
        """The rows, as ``Dataset.to_table``."""
        with translated(_ACTION):
            return super().to_table(*args, **kwargs)

    def to_batches(self, *args: Any, **kwargs: Any) -> Iterator[pa.RecordBatch]:
        """The rows in batches, as ``Dataset.to_batches``."""
        with translated(_ACTION):
            yield from super().to_batches(*args, **kwargs)

    def head(self, *args: Any, **kwargs: Any) -> pa.Table:
        """The first rows, as ``Dataset.head``."""
        with translated(_ACTION):
            return super().head(*args, **kwargs)

    def take(self, *args: Any, **kwargs: Any) -> pa.Table:
        """Rows by index, as ``Dataset.take``."""
        with translated(_ACTION):
            return super().take(*args, **kwargs)

    def count_rows(self, *args: Any, **kwargs: Any) -> int:
        """The row count, as ``Dataset.count_rows``."""
        with translated(_ACTION):
            return int(super().count_rows(*args, **kwargs))


def dataset(
    base: Any,
    files: Sequence[tuple[str, pc.Expression | None]],
    schema: pa.Schema,
) -> tuple[pads.Dataset, dict[str, str]]:
    """A Parquet dataset of *files* (real path in *base*, partition expression), and its names.

    Returns the dataset and the map from each fragment's (opaque) path to the real one.
    """
    names = {f"part-{index:05d}.parquet": path for index, (path, _) in enumerate(files)}
    filesystem = pafs.PyFileSystem(_Handler(base, names))
    # pages written with checksums (single-file snapshots) are checked as they are decoded
    parquet = pads.ParquetFileFormat(
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(
            page_checksum_verification=True
        )
    )
    fragments = [
        parquet.make_fragment(
            name,
            filesystem=filesystem,
            partition_expression=pc.scalar(True) if expression is None else expression,
        )
        for name, (_, expression) in zip(names, files, strict=True)
    ]
    return SnapshotDataset(fragments, schema, parquet, filesystem), names


def partition_expression(values: dict[str, Any], schema: pa.Schema) -> pc.Expression | None:
    """``column == value`` for every partition column (``is_null`` for a null partition)."""
    terms = []
    for name, value in values.items():
        field = pc.field(name)
        if value is None:
            terms.append(field.is_null())
        else:
            terms.append(field == pa.scalar(value, schema.field(name).type))
    if not terms:
        return None
    expression = terms[0]
    for term in terms[1:]:
        expression = expression & term
    return expression
