"""Flatten SearchImageSets summaries into Arrow columns of the declared schema, in one C++ pass.

Summaries become a nested struct of the declared types (no per-row Python or pandas work); the study
date-time is read once per distinct (date, time) pair, as strictly as the service reads it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import schema

_TIME = r"^(?P<h>[0-9]{2})(?:(?P<m>[0-9]{2})(?:(?P<s>[0-9]{2})(?:\.(?P<f>[0-9]{1,6}))?)?)?$"
_TAG_COLUMNS = [c for c in schema.COLUMNS if c.source[:1] == ("DICOMTags",)]
_TOP_COLUMNS = [c for c in schema.COLUMNS if len(c.source) == 1]
EMPTY_TABLE = schema.arrow_schema().empty_table()
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
    if not items:
        return EMPTY_TABLE
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
