"""Flattening summaries into the declared schema, checked against an independent flattening."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healthimaging_df import schema
from healthimaging_df.engine.flatten import study_datetime, summaries_to_table
from healthimaging_df.local import generate_image_sets
from healthimaging_df.local.backend import study_datetime as backend_study_datetime

from .conftest import flat_row

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("day", "clock", "expected"),
    [
        ("20200101", "101530.25", datetime(2020, 1, 1, 10, 15, 30, 250000)),
        ("20200101", None, datetime(2020, 1, 1)),
        ("20200101", "", datetime(2020, 1, 1)),
        ("20200101", "1015", datetime(2020, 1, 1, 10, 15)),
        ("20200101", "10", datetime(2020, 1, 1, 10)),
        ("20200101", "10:15:30", None),  # ACR-NEMA colons are not DICOM TM: strict, as the service
        ("20200101", "10.5", None),  # a fraction only follows seconds
        ("20200101", "1030.25", None),
        (" 20200101", "0930", None),  # no trimming either
        ("2020010\uff11", None, None),  # a full-width digit is not a digit here
        ("20200101", "101530.", None),
        ("20200229", "235959.999999", datetime(2020, 2, 29, 23, 59, 59, 999999)),
        ("20210229", "1000", None),  # no such day
        ("20190230", None, None),
        ("2019", "1000", None),  # partial date
        ("201903", None, None),
        ("", None, None),
        (None, "1000", None),
        ("20200101", "2500", None),  # present but unreadable time: NaT, not midnight
        ("20200101", "12345", None),
        ("20200101", "1260", None),
    ],
)
def test_study_datetime(day: str | None, clock: str | None, expected: datetime | None) -> None:
    result = study_datetime(pa.array([day], pa.string()), pa.array([clock], pa.string()))
    assert result.to_pylist() == [expected]


_TEXT = st.text(alphabet="0123456789.: |\uff11", max_size=16)
_REALISTIC_DATE = st.sampled_from(["20200101", "20200229", "20210229", "2020", "", " 20200101"])
_REALISTIC_TIME = st.sampled_from(["", "10", "1030", "103015", "103015.5", "103015.123456", "2400"])


@settings(max_examples=400, deadline=None, database=None)
@given(
    day=st.none() | _TEXT | _REALISTIC_DATE,
    clock=st.none() | _TEXT | _REALISTIC_TIME,
)
def test_client_and_local_service_read_study_date_times_alike(
    day: str | None, clock: str | None
) -> None:
    """If the client read a value the service cannot, a pushed-down range would lose that row."""
    tags = {k: v for k, v in (("DICOMStudyDate", day), ("DICOMStudyTime", clock)) if v is not None}
    table = summaries_to_table([{"imageSetId": "a" * 32, "DICOMTags": tags}])
    assert table.column("StudyDateTime").to_pylist() == [backend_study_datetime(tags)]


def test_flattening_matches_an_independent_flattening() -> None:
    records = generate_image_sets(n=600, seed=11)
    frame = schema.arrow_to_pandas(summaries_to_table(records))
    assert list(frame.columns) == list(schema.COLUMN_NAMES)
    for i, record in enumerate(records):
        expected = flat_row(record)
        got = frame.iloc[i]
        for name, value in expected.items():
            cell = got[name]
            if value is None:
                assert pd.isna(cell), (i, name)
            elif isinstance(value, datetime) and value.tzinfo is not None:
                assert cell == pd.Timestamp(value).tz_convert("UTC"), (i, name)
            else:
                assert cell == value, (i, name)


def test_generated_data_exercises_the_awkward_cases() -> None:
    """The flattening test above means something only if the data has these cases."""
    frame = schema.arrow_to_pandas(summaries_to_table(generate_image_sets(n=600, seed=11)))
    assert frame["StudyDateTime"].isna().any()
    assert frame["StudyDateTime"].notna().any()
    assert frame[["StudyTime", "PatientBirthDate", "StudyDescription"]].isna().any().any()
    assert (~frame["isPrimary"].astype(bool)).any()
    assert (frame["version"] > 1).any()
    assert not frame["PatientName"].dropna().map(str.isascii).all()


def test_dtypes_follow_the_schema_for_both_backends() -> None:
    table = summaries_to_table(generate_image_sets(n=20, seed=1))
    for backend in schema.DTYPE_BACKENDS:
        frame = schema.arrow_to_pandas(table, backend)
        assert frame.dtypes.to_dict() == schema.pandas_dtypes(backend)
    numpy = schema.arrow_to_pandas(table)
    assert str(numpy["createdAt"].dtype) == "datetime64[us, UTC]"
    assert str(numpy["version"].dtype) == "Int64"
    assert str(numpy["isPrimary"].dtype) == "boolean"
    assert str(numpy["StudyDateTime"].dtype) == "datetime64[us]"


def test_empty_result_has_every_column_typed() -> None:
    for backend in schema.DTYPE_BACKENDS:
        empty = schema.empty_frame(backend)
        assert len(empty) == 0
        assert empty.dtypes.to_dict() == schema.pandas_dtypes(backend)
    assert summaries_to_table([]).schema == schema.arrow_schema()


def test_fields_an_older_botocore_omits_are_null_columns() -> None:
    old = {
        "imageSetId": "a" * 32,
        "version": 1,
        "createdAt": datetime(2024, 1, 1, tzinfo=timezone.utc),
        "updatedAt": datetime(2024, 1, 1, tzinfo=timezone.utc),
        "DICOMTags": {"DICOMPatientId": "P"},
    }
    frame = schema.arrow_to_pandas(summaries_to_table([old]))
    for name in ("lastAccessedAt", "storageTier", "isPrimary", "Modality", "SeriesInstanceUID"):
        assert name in frame.columns
        assert frame[name].isna().all()


def test_docs_schema_table_is_generated_from_the_schema() -> None:
    text = (ROOT / "docs" / "schema.md").read_text(encoding="utf-8")
    assert text == schema.render_docs(), "regenerate docs/schema.md from schema.render_docs()"


def _two_versions() -> tuple[dict, dict]:
    """An image set as read before and after an update that changed its modality."""
    import copy

    old = next(
        r for r in generate_image_sets(n=50, seed=4) if r["DICOMTags"].get("DICOMSeriesModality")
    )
    new = copy.deepcopy(old)
    new["version"] = old["version"] + 1
    new["DICOMTags"]["DICOMSeriesModality"] = "ZZ"
    return old, new


@pytest.mark.parametrize("order", ["old_first", "new_first"])
def test_a_stale_copy_never_outlives_a_newer_one_that_left_the_cohort(order: str) -> None:
    from healthimaging_df import Query
    from healthimaging_df.engine.fetch import Page
    from healthimaging_df.engine.frame import Chunker, Collector

    old, new = _two_versions()
    pages = [old, new] if order == "old_first" else [new, old]
    plan = Query("0" * 32).where(Modality=old["DICOMTags"]["DICOMSeriesModality"]).compile()
    collector = Collector(plan)
    for item in pages:
        collector.add(Page(0, summaries_to_table([item])))
    assert old["imageSetId"] not in set(collector.finish()["imageSetId"])

    everything = Query("0" * 32).compile()
    collector = Collector(everything)
    for item in pages:
        collector.add(Page(0, summaries_to_table([item])))
    [kept] = collector.finish()["version"].tolist()
    assert kept == new["version"]

    chunker = Chunker(everything, 1, "numpy_nullable", {})
    chunks = [c for item in pages for c in chunker.add(Page(0, summaries_to_table([item])))] + list(
        chunker.flush()
    )
    yielded = [int(v) for c in chunks for v in c["version"]]
    # each image set comes once: at the newest version read when its chunk was yielded
    assert yielded == ([old["version"]] if order == "old_first" else [new["version"]])
