"""QIDO-RS of the local service: the default record cap, page faults, and studies that disagree."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from typing import Any

import pytest
from botocore.exceptions import ClientError

from healthimaging_df.local import LocalService
from healthimaging_df.local.faults import QIDO_MALFORMED_KINDS, Faults
from healthimaging_df.local.sigv4 import sign_request

STUDY_UID, SERIES_UID, SOP_UID, DESCRIPTION = "0020000D", "0020000E", "00080018", "00081030"


def qido(service: LocalService, resource: str, **params: Any) -> tuple[int, str, bytes]:
    """One signed QIDO-RS GET (query encoded as SigV4 canonicalises it): status, type, body."""
    query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(str(v), safe='-_.~')}"
        for k, v in params.items()
    )
    url = f"{service.dicomweb_endpoint_url}/datastore/{service.datastore_id}/{resource}"
    url += f"?{query}" if query else ""
    request = urllib.request.Request(url, headers=sign_request("GET", url))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


def rows(service: LocalService, resource: str, **params: Any) -> list[dict[str, Any]]:
    status, _, body = qido(service, resource, **params)
    assert status == 200, body
    return list(json.loads(body))


def value(record: dict[str, Any], tag: str) -> Any:
    return (record.get(tag, {}).get("Value") or [None])[0]


# -- the record cap ----------------------------------------------------------------------------


def test_the_10k_cap_is_on_by_default_and_can_be_turned_off() -> None:
    assert LocalService().qido.record_cap == 10_000
    assert LocalService(qido_record_cap=None).qido.record_cap is None
    with pytest.raises(ValueError, match="record_cap"):
        LocalService(qido_record_cap=0)


@pytest.mark.slow
def test_the_default_cap_hides_records_past_10k(ahi_service_factory: Any) -> None:
    service = ahi_service_factory(image_sets=3300, seed=5)  # about 11,500 instances
    near_end = rows(service, "instances", offset=9_990, limit=100)
    assert len(near_end) == 10  # records 10,000 onwards are unreachable
    assert rows(service, "instances", offset=10_000, limit=100) == []
    service.reset_faults()
    assert service.qido.record_cap == 10_000  # the service's own setting comes back
    service.qido.record_cap = None
    assert len(rows(service, "instances", offset=9_990, limit=100)) == 100
    uncapped = ahi_service_factory(image_sets=3300, seed=5, qido_record_cap=None)
    assert len(rows(uncapped, "instances", offset=9_990, limit=100)) == 100


# -- malformed and short pages (Faults.qido_*) --------------------------------------------------


@pytest.fixture
def qsvc(ahi_local: LocalService) -> LocalService:
    return ahi_local


@pytest.mark.parametrize("kind", QIDO_MALFORMED_KINDS)
def test_each_malformed_qido_kind(qsvc: LocalService, kind: str) -> None:
    qsvc.set_faults(qido_malformed_every=1, qido_malformed_kinds=(kind,))
    status, ctype, body = qido(qsvc, "series", limit=5)
    assert status == 200
    if kind == "empty":
        assert body == b""
    elif kind == "object":
        assert json.loads(body) == {}
    elif kind == "not_list":
        assert len(json.loads(body)["results"]) == 5
    elif kind in ("truncated",):
        with pytest.raises(json.JSONDecodeError):
            json.loads(body)
    elif kind == "html":
        assert ctype.startswith("text/html")
    elif kind == "not_objects":
        assert sum(item is None for item in json.loads(body)) == 1
    elif kind == "missing_uid":
        assert sum(SERIES_UID not in item for item in json.loads(body)) == 1
    elif kind == "missing_study_uid":
        assert sum(STUDY_UID not in item for item in json.loads(body)) == 1
    stats = qsvc.stats
    assert stats.qido_malformed_sent == 1
    assert stats.qido_malformed_by_kind == {kind: 1}
    qsvc.reset_faults()
    assert len(rows(qsvc, "series", limit=5)) == 5


def test_missing_uid_names_each_levels_key(qsvc: LocalService) -> None:
    qsvc.set_faults(qido_malformed_every=1, qido_malformed_kinds=("missing_uid",))
    for resource, tag in (("studies", STUDY_UID), ("instances", SOP_UID)):
        body = json.loads(qido(qsvc, resource, limit=4)[2])
        assert sum(tag not in item for item in body) == 1


def test_malformed_every_counts_qido_answers_only(qsvc: LocalService) -> None:
    qsvc.set_faults(qido_malformed_every=3, qido_malformed_kinds=("object", "empty"))
    qsvc.client().list_datastores()  # API requests do not count
    bodies = [qido(qsvc, "studies", limit=2)[2] for _ in range(6)]
    assert [b for b in bodies if not b.startswith(b"[")] == [b"{}", b""]
    assert [i for i, b in enumerate(bodies) if not b.startswith(b"[")] == [2, 5]


def test_page_cap_returns_fewer_than_limit_while_more_exist(qsvc: LocalService) -> None:
    full = rows(qsvc, "series", limit=200)
    qsvc.set_faults(qido_page_cap=30)
    first = rows(qsvc, "series", limit=100)
    assert len(first) == 30
    second = rows(qsvc, "series", limit=100, offset=30)
    assert first + second[:30] == full[:60]
    assert qsvc.stats.qido_short_pages_sent == 2
    assert len(rows(qsvc, "series", limit=20)) == 20  # below the cap: untouched


def test_short_rate_is_seeded_and_never_empty(qsvc: LocalService) -> None:
    def run() -> list[int]:
        qsvc.set_faults(qido_short_rate=0.5, seed=11)
        return [len(rows(qsvc, "studies", limit=40)) for _ in range(12)]

    lengths = run()
    assert lengths == run()
    assert any(n < 40 for n in lengths)
    assert any(n == 40 for n in lengths)
    assert min(lengths) >= 1
    with pytest.raises(ValueError, match="qido_page_cap"):
        Faults(qido_page_cap=0)
    with pytest.raises(ValueError, match="qido_malformed_kinds"):
        Faults(qido_malformed_kinds=("nonsense",))


# -- studies whose image sets disagree -------------------------------------------------------


def _update(service: LocalService, record: dict[str, Any], description: str, **kw: Any) -> None:
    document = {"SchemaVersion": 1.1, "Study": {"DICOM": {"StudyDescription": description}}}
    service.client().update_image_set_metadata(
        datastoreId=service.datastore_id,
        imageSetId=record["imageSetId"],
        latestVersionId=str(record["version"]),
        updateImageSetMetadataUpdates={
            "DICOMUpdates": {"updatableAttributes": json.dumps(document).encode()}
        },
        **kw,
    )


def _study(service: LocalService) -> tuple[str, list[dict[str, Any]]]:
    """A study with at least three primary image sets that agree on StudyDescription."""
    by_study: dict[str, list[dict[str, Any]]] = {}
    for record in service.backend.image_sets(str(service.datastore_id)):
        if record["isPrimary"]:
            by_study.setdefault(record["DICOMTags"]["DICOMStudyInstanceUID"], []).append(record)
    uid, members = max(by_study.items(), key=lambda item: (len(item[1]), item[0]))
    assert len(members) >= 3
    assert len({m["DICOMTags"].get("DICOMStudyDescription") for m in members}) == 1
    return uid, members


def test_an_update_without_include_study_leaves_the_study_in_disagreement(
    ahi_service_factory: Any,
) -> None:
    service = ahi_service_factory(image_sets=150, seed=8)
    uid, members = _study(service)
    old = members[0]["DICOMTags"]["DICOMStudyDescription"]
    target = members[0]
    _update(service, target, "RENAMED ONE")
    after = {r["imageSetId"]: r for r in service.backend.image_sets(str(service.datastore_id))}
    described = Counter(
        after[m["imageSetId"]]["DICOMTags"]["DICOMStudyDescription"] for m in members
    )
    assert described == {"RENAMED ONE": 1, old: len(members) - 1}  # only that image set changed
    assert after[target["imageSetId"]]["version"] == target["version"] + 1
    assert all(after[m["imageSetId"]]["version"] == m["version"] for m in members[1:])
    # /studies: one value per study, the most recently updated image set's
    studies = rows(service, "studies", StudyInstanceUID=uid)
    assert [value(s, DESCRIPTION) for s in studies] == ["RENAMED ONE"]
    assert rows(service, "studies", StudyInstanceUID=uid, StudyDescription=old) == []
    # /series: each record is one image set and reports its own values
    series = rows(service, f"studies/{uid}/series", includefield="StudyDescription")
    assert Counter(value(s, DESCRIPTION) for s in series) == described
    matched = rows(service, "series", StudyInstanceUID=uid, StudyDescription=old)
    assert {value(s, SERIES_UID) for s in matched} == {
        m["DICOMTags"]["DICOMSeriesInstanceUID"] for m in members[1:]
    }
    # the other behaviour AWS may have: series records carry the study's one value
    service.qido.series_study_values = "study"
    assert rows(service, "series", StudyInstanceUID=uid, StudyDescription=old) == []
    instances = rows(service, f"studies/{uid}/instances", includefield="StudyDescription")
    assert {value(i, DESCRIPTION) for i in instances} == {"RENAMED ONE"}
    with pytest.raises(ValueError, match="series_study_values"):
        service.qido.series_study_values = "both"
    assert service.qido.series_study_values == "study"


def test_include_study_image_sets_updates_every_primary_image_set_atomically(
    ahi_service_factory: Any,
) -> None:
    service = ahi_service_factory(image_sets=150, seed=8)
    uid, members = _study(service)
    old = members[0]["DICOMTags"]["DICOMStudyDescription"]
    _update(service, members[1], "ONE VALUE", includeStudyImageSets=True)
    after = {r["imageSetId"]: r for r in service.backend.image_sets(str(service.datastore_id))}
    for member in members:
        now = after[member["imageSetId"]]
        assert now["DICOMTags"]["DICOMStudyDescription"] == "ONE VALUE"
        assert now["version"] == member["version"] + 1
    stamps = {after[m["imageSetId"]]["updatedAt"] for m in members}
    assert len(stamps) == 1  # one atomic update: one moment for the whole study
    assert rows(service, "series", StudyInstanceUID=uid, StudyDescription=old) == []
    assert len(rows(service, "series", StudyInstanceUID=uid, StudyDescription="ONE VALUE")) == len(
        members
    )


def test_include_study_with_a_revert_is_refused(ahi_service_factory: Any) -> None:
    service = ahi_service_factory(image_sets=30, seed=8)
    record = next(
        r for r in service.backend.image_sets(str(service.datastore_id)) if r["version"] > 1
    )
    with pytest.raises(ClientError) as caught:
        service.client().update_image_set_metadata(
            datastoreId=service.datastore_id,
            imageSetId=record["imageSetId"],
            latestVersionId=str(record["version"]),
            includeStudyImageSets=True,
            updateImageSetMetadataUpdates={"revertToVersionId": "1"},
        )
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert "revertToVersionId" in caught.value.response["Error"]["Message"]


def test_botocore_sends_include_study_image_sets_as_a_query_parameter(
    ahi_local: LocalService,
) -> None:
    """The installed botocore's model has the 2026-04 flag and puts it in the query string."""
    client = ahi_local.client()
    seen: list[str] = []
    client.meta.events.register(
        "before-send.medical-imaging.UpdateImageSetMetadata",
        lambda request, **_: seen.append(request.url),
    )
    record = next(r for r in ahi_local.backend.image_sets(str(ahi_local.datastore_id)))
    document = base64.b64encode(b"{}")  # the test reads the request, not its effect
    with pytest.raises(ClientError) as caught:  # a stale version: nothing changes
        client.update_image_set_metadata(
            datastoreId=ahi_local.datastore_id,
            imageSetId=record["imageSetId"],
            latestVersionId="999999",
            includeStudyImageSets=True,
            updateImageSetMetadataUpdates={"DICOMUpdates": {"updatableAttributes": document}},
        )
    assert caught.value.response["Error"]["Code"] == "ConflictException"
    assert "includeStudyImageSets=true" in seen[0]
