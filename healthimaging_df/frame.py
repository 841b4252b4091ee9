"""The frame stage: flatten summaries into Arrow columns, filter exactly, dedupe, sort, convert once.

Summaries are converted to Arrow in one C++ pass (as a nested struct of the declared types, no
per-row Python or pandas work), filtered and deduplicated as Arrow tables, joined once and
converted to pandas once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import schema
from healthimaging_df.fetch import Page
from healthimaging_df.plan import Plan
from healthimaging_df.predicates import Predicate

_BUFFER_ROWS = 20_000
_TIME = r"^(?P<h>[0-9]{2})(?:(?P<m>[0-9]{2})(?:(?P<s>[0-9]{2})(?:\.(?P<f>[0-9]{1,6}))?)?)?$"
_TAG_COLUMNS = [c for c in schema.COLUMNS if c.source[:1] == ("DICOMTags",)]
_TOP_COLUMNS = [c for c in schema.COLUMNS if len(c.source) == 1]
# The summary's own nested shape: pyarrow converts a list of such dicts in C++, no Python loop.
_SUMMARY_TYPE = pa.struct(
    [pa.field(c.source[0], c.arrow_type) for c in _TOP_COLUMNS]
    + [
        pa.field(
            "DICOMTags", pa.struct([pa.field(c.source[1], c.arrow_type) for c in _TAG_COLUMNS])
        )
    ]
)


def summaries_to_table(items: list[dict[str, Any]]) -> pa.Table:
    """Flatten ``ImageSetsMetadataSummary`` dicts into a table of the declared schema.

    Fields an older botocore does not return come out as null columns, not missing ones; fields a
    newer one adds are ignored until the schema declares them.
    """
    summaries = pa.array(items, type=_SUMMARY_TYPE)
    arrays: dict[str, pa.Array] = {c.name: summaries.field(c.source[0]) for c in _TOP_COLUMNS}
    tags = summaries.field("DICOMTags")
    for col in _TAG_COLUMNS:
        arrays[col.name] = pc.if_else(tags.is_valid(), tags.field(col.source[1]), None)
    arrays["StudyDateTime"] = _study_datetime_once_per_pair(
        arrays["StudyDate"], arrays["StudyTime"]
    )
    return pa.Table.from_arrays(
        [arrays[n] for n in schema.COLUMN_NAMES], schema=schema.arrow_schema()
    )


def _study_datetime_once_per_pair(study_date: pa.Array, study_time: pa.Array) -> pa.Array:
    """``study_datetime`` computed once per distinct (date, time): image sets of a study share it.

    Null and empty parse alike (no date: null; no time: midnight), so both become "" in the key.
    """
    key = pc.binary_join_element_wise(
        pc.fill_null(study_date, ""), pc.fill_null(study_time, ""), "|"
    )
    encoded = pc.dictionary_encode(key)
    parts = pc.split_pattern(encoded.dictionary, "|", max_splits=1)
    unique = study_datetime(pc.list_element(parts, 0), pc.list_element(parts, 1))
    return unique.take(encoded.indices)


def study_datetime(study_date: pa.Array, study_time: pa.Array) -> pa.Array:
    """Combine DICOM DA (YYYYMMDD) and TM (HH, HHMM, HHMMSS or HHMMSS.f{1,6}) as wall-clock time.

    A valid date with no time (null or empty) is that day's midnight, as the service treats a
    missing DICOMStudyTime; an invalid or partial date, or a time that is present but not DICOM
    TM, gives null. The reading is strict on purpose, exactly as the local service reads records:
    a client more lenient than the service would lose rows whenever a StudyDateTime range is
    pushed down (the service would not return what the client would have kept).
    """
    well_formed = pc.match_substring_regex(study_date, r"^[0-9]{8}$")
    day = pc.strptime(study_date, format="%Y%m%d", unit="us", error_is_null=True)
    # strptime rolls 20190230 over to March 2nd: a real date must print back as it was written.
    real = pc.equal(pc.strftime(day, format="%Y%m%d"), study_date)
    day = pc.if_else(pc.and_(well_formed, real), day, pa.scalar(None, pa.timestamp("us")))

    absent = pc.fill_null(pc.equal(pc.utf8_length(study_time), 0), True)
    parts = pc.extract_regex(study_time, _TIME)
    hours, minutes, seconds = (_digits(pc.struct_field(parts, [i]), 2) for i in range(3))
    fraction = _digits(pc.struct_field(parts, [3]), 6)
    valid_clock = pc.and_(pc.and_(pc.less(hours, 24), pc.less(minutes, 60)), pc.less(seconds, 60))
    micros = pc.add(
        pc.multiply(
            pc.add(pc.add(pc.multiply(hours, 3600), pc.multiply(minutes, 60)), seconds),
            1_000_000,
        ),
        fraction,
    )
    readable = pc.and_(pc.is_valid(parts), pc.fill_null(valid_clock, False))
    micros = pc.if_else(readable, micros, pa.scalar(None, pa.int64()))
    offset = pc.if_else(absent, pa.scalar(0, pa.int64()), micros)
    return pc.add(day, pc.cast(offset, pa.duration("us")))


def _digits(text: pa.Array, width: int) -> pa.Array:
    """Right-pad a digit string to *width* with zeros and read it as an integer ("" -> 0)."""
    padded = pc.utf8_rpad(pc.fill_null(text, ""), width=width, padding="0")
    return pc.cast(padded, pa.int64())


def apply_predicates(table: pa.Table, predicates: tuple[Predicate, ...]) -> pa.Table:
    """Rows of *table* that satisfy every predicate."""
    if not predicates or table.num_rows == 0:
        return table
    mask = predicates[0].mask(table)
    for p in predicates[1:]:
        mask = pc.and_(mask, p.mask(table))
    return table.filter(mask)


def drop_superseded(matched: pa.Table, seen: pa.Table) -> pa.Table:
    """Rows of *matched* that hold the highest version *seen* (unfiltered) of their image set.

    Dedupe before filtering, in effect: a stale copy that matches must not outlive a newer copy
    that no longer does (an image set read twice while it was being updated).
    """
    if matched.num_rows == 0 or pc.count_distinct(seen.column("imageSetId")).as_py() == len(seen):
        return matched
    latest = seen.group_by("imageSetId").aggregate([("version", "max")])
    joined = matched.join(latest, "imageSetId")
    current = pc.greater_equal(
        pc.fill_null(joined.column("version"), -1), pc.fill_null(joined.column("version_max"), -1)
    )
    return joined.filter(current).drop_columns(["version_max"])


def dedupe_and_sort(frame: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """One row per imageSetId (highest version, then latest update), in the plan's order, limited."""
    if frame["imageSetId"].duplicated().any():
        frame = frame.sort_values(
            ["imageSetId", "version", "updatedAt"], kind="stable", na_position="first"
        ).drop_duplicates("imageSetId", keep="last")
    frame = frame.sort_values(
        [plan.sort_column, "imageSetId"],
        ascending=[plan.ascending, True],
        kind="stable",
        na_position="last",
    )
    if plan.limit is not None:
        frame = frame.head(plan.limit)
    result: pd.DataFrame = frame.reset_index(drop=True)
    return result


class Collector:
    """Gathers a plan's pages into one frame; tells the fetcher when a chain can stop."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._raw: list[dict[str, Any]] = []
        self._tables: list[pa.Table] = []
        self._versions: list[pa.Table] = []  # every (imageSetId, version) read, matched or not
        self._keys: dict[int, list[Any]] = {}

    def add(self, page: Page) -> bool:
        """Take one page; return True when its chain needs no more pages (limit reached)."""
        if page.done:
            return False
        if not self.plan.stops_early:
            self._raw.extend(page.items)
            if len(self._raw) >= _BUFFER_ROWS:
                self._flush()
            return False
        table = summaries_to_table(page.items)
        matched = apply_predicates(table, self.plan.predicates)
        self._tables.append(matched)
        self._versions.append(table.select(["imageSetId", "version"]))
        return self._limit_reached(page.chain, table, matched)

    def _limit_reached(self, chain: int, page: pa.Table, matched: pa.Table) -> bool:
        """Tell whether a chain, which arrives in sort order, can stop.

        Once it holds ``limit`` matches and the page ends past the limit-th match's sort key (so
        no tie can follow), its later pages cannot enter the result.
        """
        assert self.plan.limit is not None
        keys = self._keys.setdefault(chain, [])
        keys.extend(matched.column(self.plan.sort_column).to_pylist())
        if len(keys) < self.plan.limit or page.num_rows == 0:
            return False
        boundary = keys[self.plan.limit - 1]
        last = page.column(self.plan.sort_column)[-1].as_py()
        return boundary is not None and last is not None and last != boundary

    def _flush(self) -> None:
        if self._raw:
            table = summaries_to_table(self._raw)
            self._tables.append(apply_predicates(table, self.plan.predicates))
            self._versions.append(table.select(["imageSetId", "version"]))
            self._raw = []

    def finish(
        self,
        dtype_backend: schema.DtypeBackend = "numpy_nullable",
        provenance: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """The result: typed, deduplicated, sorted, limited, with provenance in ``attrs``."""
        self._flush()
        table = (
            pa.concat_tables(self._tables) if self._tables else schema.arrow_schema().empty_table()
        )
        if self._versions:
            table = drop_superseded(table, pa.concat_tables(self._versions))
        frame = dedupe_and_sort(schema.arrow_to_pandas(table, dtype_backend), self.plan)
        if provenance is not None:
            frame.attrs["healthimaging_df"] = provenance
        return frame


class Chunker:
    """Turns pages into frames of about ``chunk_rows`` rows, each image set once per version.

    A chunk holds the highest version read so far of each of its image sets. An image set updated
    while the scan runs can be read twice (its new version sorts after the old one, or it sits on a
    window's boundary second); if its newer version arrives after the older one was yielded, it is
    yielded again in a later chunk, so nothing stale is kept silently: keep the highest
    ``version`` per ``imageSetId`` when combining chunks of a datastore that is being written to.
    """

    def __init__(
        self,
        plan: Plan,
        chunk_rows: int,
        dtype_backend: schema.DtypeBackend,
        provenance: dict[str, Any],
    ) -> None:
        self.plan = plan
        self.chunk_rows = chunk_rows
        self.dtype_backend = dtype_backend
        self.provenance = provenance
        self._raw: list[dict[str, Any]] = []
        self._latest: dict[str, int] = {}  # highest version read of each image set
        self._yielded: dict[str, int] = {}  # version yielded of each image set
        self._any = False

    def add(self, page: Page) -> Iterator[pd.DataFrame]:
        """Take one page; yield a chunk when enough rows are buffered."""
        self._raw.extend(page.items)
        if len(self._raw) >= self.chunk_rows:
            yield from self._emit()

    def flush(self) -> Iterator[pd.DataFrame]:
        """Yield what is left; an empty result still yields one empty, typed frame."""
        yield from self._emit()
        if not self._any:
            self._any = True
            empty = schema.empty_frame(self.dtype_backend)
            empty.attrs["healthimaging_df"] = self.provenance
            yield empty

    def _emit(self) -> Iterator[pd.DataFrame]:
        if not self._raw:
            return
        table = summaries_to_table(self._raw)
        self._raw = []
        seen = table.select(["imageSetId", "version"])
        for image_set, version in zip(
            seen.column("imageSetId").to_pylist(), seen.column("version").to_pylist(), strict=True
        ):
            version = -1 if version is None else version
            if version > self._latest.get(image_set, -2):
                self._latest[image_set] = version
        matched = drop_superseded(apply_predicates(table, self.plan.predicates), seen)
        frame = schema.arrow_to_pandas(matched, self.dtype_backend)
        if frame["imageSetId"].duplicated().any():
            frame = frame.sort_values(["imageSetId", "version"], kind="stable").drop_duplicates(
                "imageSetId", keep="last"
            )
        versions = _versions_of(frame)
        fresh = [
            self._latest[i] == v and self._yielded.get(i) != v
            for i, v in zip(frame["imageSetId"].tolist(), versions, strict=True)
        ]
        frame = frame[fresh].reset_index(drop=True)
        self._yielded.update(zip(frame["imageSetId"].tolist(), _versions_of(frame), strict=True))
        if len(frame):
            self._any = True
            frame.attrs["healthimaging_df"] = self.provenance
            yield frame


def _versions_of(frame: pd.DataFrame) -> list[int]:
    """The ``version`` column as ints, a missing version as -1."""
    return list(frame["version"].fillna(-1).astype("int64").tolist())
