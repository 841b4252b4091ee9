from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from healthimaging_df.local import (
    Backend,
    ConflictError,
    ResourceNotFound,
    ValidationError,
    generate_image_sets,
)
from healthimaging_df.local.backend import study_datetime
from tests.conformance.reference import expected_ids

UTC = timezone.utc


@pytest.fixture(scope="module")
def loaded() -> tuple[Backend, str]:
    backend = Backend()
    datastore_id = backend.create_datastore("unit")
    backend.add_image_sets(datastore_id, generate_image_sets(4000, seed=21))
    return backend, datastore_id


def all_ids(
    backend: Backend, datastore_id: str, criteria: dict[str, Any] | None, size: int = 50
) -> list[str]:
    out: list[str] = []
    token = None
    while True:
        page = backend.search(datastore_id, criteria, size, token)
        out += [r["imageSetId"] for r in page["imageSetsMetadataSummaries"]]
        token = page.get("nextToken")
        if token is None:
            return out


def test_datastore_ids_and_lookup() -> None:
    backend = Backend()
    first, second = backend.create_datastore("a"), backend.create_datastore("b")
    assert first != second
    assert len(first) == 32
    assert backend.get_datastore(first)["datastoreName"] == "a"
    assert [d["datastoreId"] for d in backend.list_datastores()["datastoreSummaries"]] == sorted(
        [first, second]
    )
    with pytest.raises(ResourceNotFound):
        backend.search("f" * 32, None)
    with pytest.raises(ValueError, match="name"):
        backend.create_datastore("bad name!")


def test_duplicate_ids_conflict() -> None:
    backend = Backend()
    ds = backend.create_datastore("d")
    records = generate_image_sets(5, seed=1)
    backend.add_image_sets(ds, records)
    with pytest.raises(ConflictError):
        backend.add_image_sets(ds, records[:1])


def test_image_sets_are_copies(loaded: tuple[Backend, str]) -> None:
    backend, ds = loaded
    rows = backend.image_sets(ds)
    rows[0]["DICOMTags"]["DICOMPatientId"] = "changed"
    assert backend.image_sets(ds)[0]["DICOMTags"]["DICOMPatientId"] != "changed"


CRITERIA: list[dict[str, Any]] = [
    {"filters": [{"values": [{"isPrimary": False}], "operator": "EQUAL"}]},
    {
        "filters": [{"values": [{"isPrimary": True}], "operator": "EQUAL"}],
        "sort": {"sortField": "createdAt", "sortOrder": "ASC"},
    },
    {
        "filters": [
            {
                "values": [
                    {"createdAt": datetime(2024, 1, 1, tzinfo=UTC)},
                    {"createdAt": datetime(2024, 3, 1, tzinfo=UTC)},
                ],
                "operator": "BETWEEN",
            },
            {"values": [{"isPrimary": True}], "operator": "EQUAL"},
        ],
        "sort": {"sortField": "DICOMStudyDateAndTime", "sortOrder": "DESC"},
    },
    {
        "filters": [
            {
                "values": [
                    {"updatedAt": datetime(2023, 1, 1, tzinfo=UTC)},
                    {"updatedAt": datetime(2025, 6, 1, tzinfo=UTC)},
                ],
                "operator": "BETWEEN",
            },
            {
                "values": [
                    {"createdAt": datetime(2024, 1, 1, tzinfo=UTC)},
                    {"createdAt": datetime(2025, 1, 1, tzinfo=UTC)},
                ],
                "operator": "BETWEEN",
            },
        ],
        "sort": {"sortField": "updatedAt", "sortOrder": "ASC"},
    },
    {
        "filters": [
            {
                "values": [
                    {"DICOMStudyDateAndTime": {"DICOMStudyDate": "20150101"}},
                    {
                        "DICOMStudyDateAndTime": {
                            "DICOMStudyDate": "20201231",
                            "DICOMStudyTime": "235959.999999",
                        }
                    },
                ],
                "operator": "BETWEEN",
            }
        ],
        "sort": {"sortField": "DICOMStudyDateAndTime", "sortOrder": "ASC"},
    },
]


@pytest.mark.parametrize("index", range(len(CRITERIA)))
@pytest.mark.parametrize("size", [1, 17, 50])
def test_search_matches_brute_force(loaded: tuple[Backend, str], index: int, size: int) -> None:
    backend, ds = loaded
    criteria = CRITERIA[index]
    expected = expected_ids(backend.image_sets(ds), criteria)
    assert expected  # each case must select something
    assert all_ids(backend, ds, criteria, size) == expected


def test_equal_on_each_id_attribute(loaded: tuple[Backend, str]) -> None:
    backend, ds = loaded
    record = next(r for r in backend.image_sets(ds) if len(r["DICOMTags"]) == 16)
    for attribute in (
        "DICOMPatientId",
        "DICOMAccessionNumber",
        "DICOMStudyId",
        "DICOMStudyInstanceUID",
        "DICOMSeriesInstanceUID",
    ):
        criteria = {
            "filters": [
                {"values": [{attribute: record["DICOMTags"][attribute]}], "operator": "EQUAL"}
            ]
        }
        found = all_ids(backend, ds, criteria)
        assert record["imageSetId"] in found
        assert found == expected_ids(backend.image_sets(ds), criteria)


def test_equal_is_case_sensitive(loaded: tuple[Backend, str]) -> None:
    backend, ds = loaded
    pid = next(
        r["DICOMTags"]["DICOMPatientId"]
        for r in backend.image_sets(ds)
        if r["DICOMTags"].get("DICOMPatientId", "").startswith("PAT")
    )
    criteria = {"filters": [{"values": [{"DICOMPatientId": pid.lower()}], "operator": "EQUAL"}]}
    assert backend.search(ds, criteria)["imageSetsMetadataSummaries"] == []


def test_keyset_pagination_survives_concurrent_inserts() -> None:
    backend = Backend()
    ds = backend.create_datastore("k")
    records = generate_image_sets(600, seed=2)
    backend.add_image_sets(ds, records[:400])
    criteria = {"sort": {"sortField": "createdAt", "sortOrder": "ASC"}}
    page = backend.search(ds, criteria, 50)
    seen = [r["imageSetId"] for r in page["imageSetsMetadataSummaries"]]
    cursor_time = page["imageSetsMetadataSummaries"][-1]["createdAt"]
    backend.add_image_sets(ds, records[400:])  # lands on both sides of the cursor
    token = page["nextToken"]
    while token:
        page = backend.search(ds, criteria, 50, token)
        seen += [r["imageSetId"] for r in page["imageSetsMetadataSummaries"]]
        token = page.get("nextToken")
    assert len(seen) == len(set(seen))
    originals = {r["imageSetId"] for r in records[:400]}
    assert originals <= set(seen)
    later_new = {r["imageSetId"] for r in records[400:] if r["createdAt"] > cursor_time}
    assert later_new <= set(seen)


def test_update_creates_versions_and_moves_in_index() -> None:
    backend = Backend()
    ds = backend.create_datastore("u")
    backend.add_image_sets(ds, generate_image_sets(50, seed=4))
    backend.search(ds, None)  # build indexes, so the update must maintain them
    target = backend.image_sets(ds)[10]
    now = datetime(2030, 1, 1, tzinfo=UTC)
    new = backend.update_image_set(
        ds,
        target["imageSetId"],
        is_primary=False,
        tags={"DICOMPatientId": "NEWPID", "DICOMStudyId": None},
        now=now,
    )
    assert new["version"] == target["version"] + 1
    assert new["updatedAt"] == now
    assert "DICOMStudyId" not in new["DICOMTags"]
    top = backend.search(ds, None, 1)["imageSetsMetadataSummaries"][0]
    assert top["imageSetId"] == target["imageSetId"]
    by_pid = backend.search(
        ds, {"filters": [{"values": [{"DICOMPatientId": "NEWPID"}], "operator": "EQUAL"}]}
    )
    assert [r["imageSetId"] for r in by_pid["imageSetsMetadataSummaries"]] == [target["imageSetId"]]
    versions = backend.list_image_set_versions(ds, target["imageSetId"])["imageSetPropertiesList"]
    assert [v["versionId"] for v in versions] == [str(n) for n in range(new["version"], 0, -1)]
    assert backend.get_image_set(ds, target["imageSetId"], "1")["versionId"] == "1"
    with pytest.raises(ValueError, match="later"):
        backend.update_image_set(ds, target["imageSetId"], now=now)
    with pytest.raises(ResourceNotFound):
        backend.get_image_set(ds, target["imageSetId"], "99")


def test_metadata_counts_as_access(loaded: tuple[Backend, str]) -> None:
    backend, ds = loaded
    archived = next(
        r for r in backend.image_sets(ds) if r["storageTier"] == "ARCHIVE_INSTANT_ACCESS"
    )
    document = backend.get_image_set_metadata(ds, archived["imageSetId"])
    assert document == backend.get_image_set_metadata(ds, archived["imageSetId"])  # deterministic
    assert document["SchemaVersion"] == "1.1"
    assert document["Patient"]["DICOM"].get("PatientID") == archived["DICOMTags"].get(
        "DICOMPatientId"
    )
    (series,) = document["Study"]["Series"].values()
    assert series["DICOM"]["Modality"] == archived["DICOMTags"]["DICOMSeriesModality"]
    assert 2 <= len(series["Instances"]) <= 5
    after = next(r for r in backend.image_sets(ds) if r["imageSetId"] == archived["imageSetId"])
    assert after["storageTier"] == "FREQUENT_ACCESS"
    assert after["lastAccessedAt"] > archived["lastAccessedAt"]
    assert after["version"] == archived["version"]


@pytest.mark.parametrize(
    ("criteria", "fragment"),
    [
        ({"filters": []}, "filters"),
        (
            {
                "filters": [
                    {"values": [{"DICOMPatientId": "P1", "DICOMStudyId": "1"}], "operator": "EQUAL"}
                ]
            },
            "exactly one attribute",
        ),
        ({"filters": [{"values": [{"DICOMPatientId": "P1"}], "operator": "LIKE"}]}, "operator"),
        (
            {
                "filters": [
                    {"values": [{"DICOMPatientId": "A"}], "operator": "EQUAL"},
                    {"values": [{"DICOMPatientId": "B"}], "operator": "EQUAL"},
                ]
            },
            "already",
        ),
        ({"sort": {"sortField": "DICOMPatientId", "sortOrder": "ASC"}}, "sortField"),
        ({"sort": {"sortField": "createdAt", "sortOrder": "UP"}}, "sortOrder"),
        ({"filters": [{"values": [{"isPrimary": "yes"}], "operator": "EQUAL"}]}, "boolean"),
        (
            {
                "filters": [
                    {
                        "values": [{"createdAt": "yesterday"}, {"createdAt": 5}],
                        "operator": "BETWEEN",
                    }
                ]
            },
            "timestamp",
        ),
    ],
)
def test_validation_messages(
    loaded: tuple[Backend, str], criteria: dict[str, Any], fragment: str
) -> None:
    backend, ds = loaded
    with pytest.raises(ValidationError, match=fragment) as caught:
        backend.search(ds, criteria)
    assert caught.value.code == "ValidationException"
    assert "P1" not in caught.value.message


def test_max_results_bounds(loaded: tuple[Backend, str]) -> None:
    backend, ds = loaded
    for bad in (0, 51, True):
        with pytest.raises(ValidationError, match="maxResults"):
            backend.search(ds, None, bad)


def test_tokens_bound_to_server_and_query(loaded: tuple[Backend, str]) -> None:
    backend, ds = loaded
    token = backend.search(ds, None, 5)["nextToken"]
    other = Backend(secret=b"another server")
    other_ds = other.create_datastore("unit")
    other.add_image_sets(other_ds, generate_image_sets(10, seed=21))
    with pytest.raises(ValidationError, match="not issued"):
        other.search(other_ds, None, 5, token)
    with pytest.raises(ValidationError, match="different query"):
        backend.search(
            ds, {"filters": [{"values": [{"isPrimary": True}], "operator": "EQUAL"}]}, 5, token
        )
    for junk in ("", "x" * 9000, "abc", "é.é"):
        with pytest.raises(ValidationError):
            backend.search(ds, None, 5, junk)


def test_timestamp_forms_are_equivalent(loaded: tuple[Backend, str]) -> None:
    backend, ds = loaded
    low, high = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)
    forms = [
        (low, high),
        (low.timestamp(), high.timestamp()),
        (low.isoformat(), "2024-05-31T20:00:00-04:00"),
    ]
    results = [
        all_ids(
            backend,
            ds,
            {"filters": [{"values": [{"createdAt": a}, {"createdAt": b}], "operator": "BETWEEN"}]},
        )
        for a, b in forms
    ]
    assert results[0]
    assert results[0] == results[1] == results[2]


def test_between_is_inclusive() -> None:
    backend = Backend()
    ds = backend.create_datastore("i")
    record = generate_image_sets(1, seed=0)[0]
    record = {
        **record,
        "createdAt": datetime(2024, 1, 1, 12, tzinfo=UTC),
        "updatedAt": datetime(2024, 1, 1, 12, tzinfo=UTC),
    }
    backend.add_image_sets(ds, [record])
    exact = {
        "filters": [
            {
                "values": [{"createdAt": record["createdAt"]}, {"createdAt": record["createdAt"]}],
                "operator": "BETWEEN",
            }
        ]
    }
    assert len(backend.search(ds, exact)["imageSetsMetadataSummaries"]) == 1
    later = record["createdAt"] + timedelta(microseconds=1)
    after = {
        "filters": [{"values": [{"createdAt": later}, {"createdAt": later}], "operator": "BETWEEN"}]
    }
    assert backend.search(ds, after)["imageSetsMetadataSummaries"] == []


@pytest.mark.parametrize(
    ("date", "time", "expected"),
    [
        ("20240101", None, datetime(2024, 1, 1)),
        ("20240101", "", datetime(2024, 1, 1)),
        ("20240101", "13", datetime(2024, 1, 1, 13)),
        ("20240101", "1305", datetime(2024, 1, 1, 13, 5)),
        ("20240101", "130507.25", datetime(2024, 1, 1, 13, 5, 7, 250000)),
        ("2024", "130507", None),
        ("", None, None),
        ("20240230", None, None),
        ("20240101", "25", None),
        ("20240101", "13:05", None),
    ],
)
def test_record_study_datetime(date: str, time: str | None, expected: datetime | None) -> None:
    tags = (
        {"DICOMStudyDate": date}
        if time is None
        else {"DICOMStudyDate": date, "DICOMStudyTime": time}
    )
    assert study_datetime(tags) == expected


def test_concurrent_searches_and_updates_are_safe() -> None:
    import threading

    backend = Backend()
    ds = backend.create_datastore("c")
    backend.add_image_sets(ds, generate_image_sets(1500, seed=8))
    victims = [r["imageSetId"] for r in backend.image_sets(ds)[:200]]
    errors: list[BaseException] = []
    results: list[list[str]] = []

    def reader() -> None:
        try:
            results.append(
                all_ids(backend, ds, {"sort": {"sortField": "createdAt", "sortOrder": "DESC"}}, 40)
            )
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def writer() -> None:
        try:
            for image_set_id in victims:
                backend.update_image_set(ds, image_set_id, tags={"DICOMStudyDescription": "X"})
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [
        threading.Thread(target=writer)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # createdAt never changes on update, so every reader sees each image set exactly once.
    assert all(len(found) == 1500 == len(set(found)) for found in results)
    assert all(r["version"] >= 2 for r in backend.image_sets(ds) if r["imageSetId"] in set(victims))
