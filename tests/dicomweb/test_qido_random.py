"""Random series-level QIDO-RS queries against a brute-force reading of the same image sets."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from healthimaging_df.dicomweb import QidoClient, decode_dataset
from healthimaging_df.local import LocalService

MODALITIES = ["CT", "MR", "CR", "DX", "US", "PT", "NM", "MG", "SR", "XA"]
NAME_PATTERNS = ["S*", "*a*", "M?ller^*", "*^Anna", "Ross?^*", "Nguyen^Anh", "*"]
DESCRIPTIONS = ["CT *", "*CONTRAST", "XR ?HEST*", "MAMMO SCREENING BILATERAL"]
YEARS = list(range(2012, 2027))


def _like(pattern: str, value: Any) -> bool:
    if pattern.strip("*") == "":
        return True  # "*" alone is universal matching: absent and empty values too
    return isinstance(value, str) and _regex(pattern).fullmatch(value) is not None


def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    )


def _expected(truth: dict[str, Any], query: dict[str, str]) -> set[str]:
    out = set()
    for uid, record in truth["series"].items():
        study = max(
            truth["studies"][record["DICOMTags"]["DICOMStudyInstanceUID"]],
            key=lambda r: (r["updatedAt"], r["imageSetId"]),
        )
        tags, study_tags = record["DICOMTags"], study["DICOMTags"]
        ok = True
        if "Modality" in query:
            ok &= tags.get("DICOMSeriesModality") == query["Modality"]
        if "PatientName" in query:
            ok &= _like(query["PatientName"], study_tags.get("DICOMPatientName"))
        if "StudyDescription" in query:
            ok &= _like(query["StudyDescription"], study_tags.get("DICOMStudyDescription"))
        if "StudyDate" in query:
            low, high = query["StudyDate"].split("-")
            date = study_tags.get("DICOMStudyDate") or ""
            ok &= bool(re.fullmatch(r"[0-9]{8}", date)) and (low or "0") <= date <= (high or "9")
        if ok:
            out.add(uid)
    return out


@st.composite
def queries(draw: st.DrawFn) -> dict[str, str]:
    query: dict[str, str] = {}
    if draw(st.booleans()):
        query["Modality"] = draw(st.sampled_from(MODALITIES))
    if draw(st.booleans()):
        query["PatientName"] = draw(st.sampled_from(NAME_PATTERNS))
    if draw(st.booleans()):
        query["StudyDescription"] = draw(st.sampled_from(DESCRIPTIONS))
    if draw(st.booleans()):
        low = draw(st.sampled_from([None, *YEARS]))
        high = draw(st.sampled_from([None, *YEARS]))
        if low is None and high is None:
            low = 2020
        query["StudyDate"] = (
            f"{'' if low is None else f'{low}0101'}-{'' if high is None else f'{high}1231'}"
        )
    return query


def test_random_series_queries_match_brute_force(
    qido: QidoClient, ahi_local: LocalService, truth: dict[str, Any]
) -> None:
    datastore_id = ahi_local.datastore_id
    assert datastore_id is not None

    @settings(max_examples=10, deadline=None, database=None)
    @given(query=queries())
    def check(query: dict[str, str]) -> None:
        result = qido.search(datastore_id, "series", query)
        found = [decode_dataset(r)["SeriesInstanceUID"] for r in result.records]
        assert set(found) == _expected(truth, query)
        assert len(found) == len(set(found))

    check()
