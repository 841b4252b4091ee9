"""Every QIDO-RS assumption of service-facts.md, checked at the local endpoint over signed HTTP.

Each answer is compared with a brute-force reading of the same image sets (primary ones).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from healthimaging_df.dicomweb import QidoClient, decode_dataset
from healthimaging_df.errors import DICOMwebError, DICOMwebTruncatedError
from healthimaging_df.local import LocalService
from healthimaging_df.local.backend import metadata_document


def _ds(service: LocalService) -> str:
    assert service.datastore_id is not None
    return service.datastore_id


def _rows(
    qido: QidoClient, service: LocalService, level: Any, params: dict[str, Any], **kw: Any
) -> list[dict[str, Any]]:
    result = qido.search(_ds(service), level, params, **kw)
    return [decode_dataset(r) for r in result.records]


def _uids(rows: list[dict[str, Any]], key: str) -> set[str]:
    return {r[key] for r in rows}


def test_paths_and_levels(qido: QidoClient, ahi_local: LocalService, truth: dict[str, Any]) -> None:
    studies = _rows(qido, ahi_local, "studies", {})
    assert _uids(studies, "StudyInstanceUID") == set(truth["studies"])
    assert len(studies) == len(truth["studies"])
    every_series = _rows(qido, ahi_local, "series", {})  # datastore-wide: two pages of 1000
    assert _uids(every_series, "SeriesInstanceUID") == set(truth["series"])
    assert len(every_series) > 1000
    study_uid, members = max(truth["studies"].items(), key=lambda kv: len(kv[1]))
    series = _rows(qido, ahi_local, "series", {}, study_uid=study_uid)
    expected = {r["DICOMTags"]["DICOMSeriesInstanceUID"] for r in members}
    assert _uids(series, "SeriesInstanceUID") == expected
    assert all(r["StudyInstanceUID"] == study_uid for r in series)
    series_uid = series[0]["SeriesInstanceUID"]
    record = truth["series"][series_uid]
    document = metadata_document(_ds(ahi_local), record)
    expected_sops = set(document["Study"]["Series"][series_uid]["Instances"])
    instances = _rows(qido, ahi_local, "instances", {}, study_uid=study_uid, series_uid=series_uid)
    assert _uids(instances, "SOPInstanceUID") == expected_sops
    assert series[0]["NumberOfSeriesRelatedInstances"] == len(expected_sops)
    in_study = _rows(qido, ahi_local, "instances", {}, study_uid=study_uid)
    assert _uids(instances, "SOPInstanceUID") <= _uids(in_study, "SOPInstanceUID")
    assert len(in_study) == sum(s["NumberOfSeriesRelatedInstances"] for s in series)
    wide = _rows(qido, ahi_local, "instances", {"SOPInstanceUID": sorted(expected_sops)[0]})
    assert [r["SeriesInstanceUID"] for r in wide] == [series_uid]
    # three searches of one page each, and the empty page that ends each (a short page is no
    # proof of the last one: a server may cap its pages below the limit asked for)
    assert ahi_local.stats.by_operation["SearchDICOMInstances"] == 6


def test_dicom_json_model(qido: QidoClient, ahi_local: LocalService) -> None:
    page, _ = qido.get(_ds(ahi_local), "studies", {"PatientName": "*"}, limit=20)
    assert len(page) == 20
    for dataset in page:
        assert all(re.fullmatch(r"[0-9A-F]{8}", tag) for tag in dataset)
        assert all("vr" in element for element in dataset.values())
        name = dataset["00100010"]
        assert name["vr"] == "PN"
        assert all(set(v) == {"Alphabetic"} for v in name.get("Value", []))
        assert dataset["0020000D"]["vr"] == "UI"
        assert isinstance(dataset["00201206"]["Value"][0], int)
        assert dataset["00080061"]["vr"] == "CS"


def test_study_keys_match_by_keyword_or_tag(
    qido: QidoClient, ahi_local: LocalService, truth: dict[str, Any]
) -> None:
    record = next(r for r in truth["primary"] if r["DICOMTags"].get("DICOMAccessionNumber"))
    accession = record["DICOMTags"]["DICOMAccessionNumber"]
    by_keyword = _rows(qido, ahi_local, "studies", {"AccessionNumber": accession})
    by_tag = _rows(qido, ahi_local, "studies", {"00080050": accession})
    expected = {
        uid
        for uid, members in truth["studies"].items()
        if members[0]["DICOMTags"].get("DICOMAccessionNumber") == accession
    }
    assert _uids(by_keyword, "StudyInstanceUID") == _uids(by_tag, "StudyInstanceUID") == expected
    ct = _rows(qido, ahi_local, "series", {"00080060": "CT"})
    assert _uids(ct, "SeriesInstanceUID") == {
        uid for uid, r in truth["series"].items() if r["DICOMTags"]["DICOMSeriesModality"] == "CT"
    }


def test_unsupported_key_is_rejected(qido: QidoClient, ahi_local: LocalService) -> None:
    with pytest.raises(DICOMwebError) as caught:
        qido.get(_ds(ahi_local), "studies", {"Modality": "CT"})  # a series key
    assert caught.value.status == 400


def test_date_ranges_are_inclusive(
    qido: QidoClient, ahi_local: LocalService, truth: dict[str, Any]
) -> None:
    def expected(low: str, high: str) -> set[str]:
        return {
            uid
            for uid, members in truth["studies"].items()
            if re.fullmatch(
                r"[0-9]{8}", date := members[0]["DICOMTags"].get("DICOMStudyDate") or ""
            )
            and low <= date <= high
        }

    date = next(
        r["DICOMTags"]["DICOMStudyDate"]
        for r in truth["primary"]
        if re.fullmatch(r"[0-9]{8}", r["DICOMTags"].get("DICOMStudyDate") or "")
    )
    same_day = _rows(qido, ahi_local, "studies", {"StudyDate": f"{date}-{date}"})
    assert _uids(same_day, "StudyInstanceUID") == expected(date, date) != set()
    window = _rows(qido, ahi_local, "studies", {"StudyDate": "20200101-20211231"})
    assert _uids(window, "StudyInstanceUID") == expected("20200101", "20211231")
    since = _rows(qido, ahi_local, "studies", {"StudyDate": "20240101-"})
    assert _uids(since, "StudyInstanceUID") == expected("20240101", "99999999")
    single = _rows(qido, ahi_local, "studies", {"StudyDate": date})
    assert _uids(single, "StudyInstanceUID") == expected(date, date)


def test_wildcards_star_and_question_mark(
    qido: QidoClient, ahi_local: LocalService, truth: dict[str, Any]
) -> None:
    def expected(pattern: str) -> set[str]:
        regex = re.compile(pattern)
        return {
            uid
            for uid, members in truth["studies"].items()
            if regex.fullmatch(members[0]["DICOMTags"].get("DICOMPatientName") or "\0")
        }

    universal = _rows(qido, ahi_local, "studies", {"PatientName": "*"})
    assert len(universal) == len(truth["studies"])  # "*" alone matches absent names too
    star = _rows(qido, ahi_local, "studies", {"PatientName": "S*"})
    assert _uids(star, "StudyInstanceUID") == expected(r"S.*") != set()
    lower = _rows(qido, ahi_local, "studies", {"PatientName": "s*"})
    assert _uids(lower, "StudyInstanceUID") == expected(r"s.*")  # case-sensitive without fuzzy
    question = _rows(qido, ahi_local, "studies", {"PatientName": "Ross?^*"})
    assert _uids(question, "StudyInstanceUID") == expected(r"Ross.\^.*") != set()
    description = _rows(qido, ahi_local, "studies", {"StudyDescription": "CT * W/O CONTRAST"})
    assert len(description) > 0
    assert all(r["StudyDescription"].startswith("CT ") for r in description)


def test_fuzzy_matching_is_case_insensitive_word_prefix(
    qido: QidoClient, ahi_local: LocalService, truth: dict[str, Any]
) -> None:
    def words(text: str) -> list[str]:
        return [w for w in re.split(r"[\^\s=,]+", text.casefold()) if w]

    name = next(
        r["DICOMTags"]["DICOMPatientName"]
        for r in truth["primary"]
        if len(words(r["DICOMTags"].get("DICOMPatientName") or "")) >= 2
    )
    query = " ".join(w[:2] for w in words(name)[:2]).upper()
    fuzzy = _rows(qido, ahi_local, "studies", {"PatientName": query, "fuzzymatching": "true"})
    expected = {
        uid
        for uid, members in truth["studies"].items()
        if all(
            any(
                w.startswith(q)
                for w in words(members[0]["DICOMTags"].get("DICOMPatientName") or "")
            )
            for q in words(query)
        )
    }
    assert _uids(fuzzy, "StudyInstanceUID") == expected != set()
    exact_name = next(r["PatientName"] for r in fuzzy)
    exact = _rows(qido, ahi_local, "studies", {"PatientName": exact_name})
    again = _rows(qido, ahi_local, "studies", {"PatientName": exact_name, "fuzzymatching": "true"})
    assert _uids(exact, "StudyInstanceUID") <= _uids(again, "StudyInstanceUID")


def test_includefield_repeatable_all_and_unknown(qido: QidoClient, ahi_local: LocalService) -> None:
    ds = _ds(ahi_local)
    plain, _ = qido.get(ds, "series", {}, limit=5)
    assert "0008103E" not in plain[0]
    both, _ = qido.get(ds, "series", {"includefield": ["SeriesDescription", "00080070"]}, limit=5)
    assert {"0008103E", "00080070"} <= set(both[0])
    unknown, _ = qido.get(
        ds, "series", {"includefield": ["00091001", "SeriesDescription"]}, limit=5
    )
    assert "00091001" not in unknown[0]
    assert "0008103E" in unknown[0]
    everything, _ = qido.get(ds, "series", {"includefield": ["all"]}, limit=5)
    assert {"0008103E", "00080070", "00100040"} <= set(everything[0])
    with pytest.raises(DICOMwebError) as caught:
        qido.get(ds, "series", {"includefield": [f"0010{n:04X}" for n in range(51)]})
    assert caught.value.status == 400


def test_limit_and_offset_maxima(qido: QidoClient, ahi_local: LocalService) -> None:
    ds = _ds(ahi_local)
    default, _ = qido.get(ds, "series", {}, limit=1000)
    assert len(default) == 1000
    for limit, offset in ((1001, 0), (0, 0), (10, 1_000_001)):
        with pytest.raises(DICOMwebError) as caught:
            qido.get(ds, "series", {}, limit=limit, offset=offset)
        assert caught.value.status == 400
    far, _ = qido.get(ds, "series", {}, limit=10, offset=1_000_000)
    assert far == []
    first, _ = qido.get(ds, "studies", {}, limit=10)
    second, _ = qido.get(ds, "studies", {}, limit=10, offset=10)
    both, _ = qido.get(ds, "studies", {}, limit=20)
    assert first + second == both


def test_documented_order(qido: QidoClient, ahi_local: LocalService, truth: dict[str, Any]) -> None:
    studies = _rows(qido, ahi_local, "studies", {})
    updated = [
        max(r["updatedAt"] for r in truth["studies"][s["StudyInstanceUID"]]) for s in studies
    ]
    assert updated == sorted(updated, reverse=True)
    study_uid = max(truth["studies"], key=lambda uid: len(truth["studies"][uid]))
    numbers = [r["SeriesNumber"] for r in _rows(qido, ahi_local, "series", {}, study_uid=study_uid)]
    present = [n for n in numbers if n is not None]
    assert present == sorted(present)
    assert len(present) > 1
    instances = _rows(qido, ahi_local, "instances", {}, study_uid=study_uid)
    per_series: dict[str, list[int]] = {}
    for row in instances:
        per_series.setdefault(row["SeriesInstanceUID"], []).append(row["InstanceNumber"])
    flat = [r["InstanceNumber"] for r in instances]
    assert flat == sorted(flat)


def test_primary_image_sets_only(ahi_service_factory: Any) -> None:
    from healthimaging_df.dicomweb import make_qido_client

    service = ahi_service_factory(image_sets=60, seed=3)
    ds = _ds(service)
    qido = make_qido_client(service.client(), max_tps=None)
    records = service.backend.image_sets(ds)
    copies = [r for r in records if not r["isPrimary"]]
    series_uids = {r["DICOMTags"]["DICOMSeriesInstanceUID"] for r in records if r["isPrimary"]}
    assert _uids(_rows(qido, service, "series", {}), "SeriesInstanceUID") == series_uids
    assert copies, "the generator makes some non-primary copies"
    target = next(r for r in records if r["isPrimary"])
    uid = target["DICOMTags"]["DICOMSeriesInstanceUID"]
    service.backend.update_image_set(ds, target["imageSetId"], is_primary=False)
    after = _uids(_rows(qido, service, "series", {}), "SeriesInstanceUID")
    assert uid not in after
    assert after == series_uids - {uid}


def test_older_record_cap_fault_is_detected(ahi_local: LocalService) -> None:
    from healthimaging_df.dicomweb import make_qido_client

    ds = _ds(ahi_local)
    ahi_local.qido.record_cap = 120
    qido = make_qido_client(ahi_local.client(), max_tps=None)
    qido.record_cap = 120  # the client's notion of the cap, shrunk with the service's
    with pytest.raises(DICOMwebTruncatedError) as caught:
        qido.search(ds, "studies", {}, page_size=50)
    assert caught.value.records == 120
    report = qido.search(ds, "studies", {}, page_size=50, on_truncation="report")
    assert report.truncated
    assert len(report.records) == 120
    assert report.requests == 4  # 50, 50, 20, then the empty page at the cap
    beyond, _ = qido.get(ds, "studies", {}, limit=10, offset=120)
    assert beyond == []  # the rest is unreachable at any offset
    ahi_local.qido.refuse_past_cap = True  # the other way the older revision may behave
    refused = qido.search(ds, "studies", {}, page_size=60, on_truncation="report")
    assert refused.truncated
    assert "refused" in str(refused.reason)
    assert len(refused.records) == 120
    ahi_local.reset_faults()
    assert qido.search(ds, "studies", {}, page_size=50).truncated is False


@pytest.mark.slow
def test_older_10k_cap_at_its_real_size(ahi_service_factory: Any) -> None:
    from healthimaging_df.dicomweb import make_qido_client

    service = ahi_service_factory(image_sets=3300, seed=5)
    qido = make_qido_client(service.client(), max_tps=None)
    ds = _ds(service)
    primary = [r for r in service.backend.image_sets(ds) if r["isPrimary"]]
    total = sum(
        len(metadata_document(ds, r)["Study"]["Series"].popitem()[1]["Instances"]) for r in primary
    )
    assert total > 10_000
    service.qido.record_cap = 10_000
    with pytest.raises(DICOMwebTruncatedError) as caught:
        qido.search(ds, "instances", {})
    assert caught.value.records == 10_000
