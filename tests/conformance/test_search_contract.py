"""SearchImageSets contract: the documented examples, pagination, sorting, validation, errors."""

from __future__ import annotations

import gzip
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import botocore.retries.standard
import pytest
from botocore.exceptions import ClientError

from healthimaging_df.local import LocalService
from tests.conformance.reference import expected_ids, matches

UTC = timezone.utc


def search_all(
    target: Any, criteria: dict[str, Any] | None = None, page_size: int = 50
) -> list[dict[str, Any]]:
    """Every summary, following nextToken by hand (guarding against a repeated token)."""
    kwargs: dict[str, Any] = {"datastoreId": target.datastore_id, "maxResults": page_size}
    if criteria is not None:
        kwargs["searchCriteria"] = criteria
    rows: list[dict[str, Any]] = []
    seen_tokens: set[str] = set()
    while True:
        page = target.client.search_image_sets(**kwargs)
        rows.extend(page["imageSetsMetadataSummaries"])
        token = page.get("nextToken")
        if token is None:
            return rows
        assert token not in seen_tokens, "the service repeated a nextToken"
        seen_tokens.add(token)
        kwargs["nextToken"] = token


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["imageSetId"] for row in rows]


def sample(target: Any, **criteria: Any) -> dict[str, Any]:
    page = target.client.search_image_sets(datastoreId=target.datastore_id, maxResults=50)
    rows = [
        r
        for r in page["imageSetsMetadataSummaries"]
        if all(r["DICOMTags"].get(k) for k in criteria)
    ]
    assert rows, "the datastore needs image sets to test with"
    return rows[len(rows) // 2]


def check(target: Any, criteria: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Local: exactly the brute-force answer in order. Live: every row matches."""
    if target.local:
        assert ids(rows) == expected_ids(target.backend.image_sets(target.datastore_id), criteria)
    else:
        as_utc = [
            {
                **r,
                "createdAt": r["createdAt"].astimezone(UTC),
                "updatedAt": r["updatedAt"].astimezone(UTC),
            }
            for r in rows
        ]
        assert all(matches(r, criteria) for r in as_utc)


# -- the four documented example requests ------------------------------------------------------


def test_example_patient_id(target: Any) -> None:
    patient = sample(target, DICOMPatientId=True)["DICOMTags"]["DICOMPatientId"]
    criteria = {"filters": [{"values": [{"DICOMPatientId": patient}], "operator": "EQUAL"}]}
    rows = search_all(target, criteria)
    assert rows
    assert all(r["DICOMTags"]["DICOMPatientId"] == patient for r in rows)
    check(target, criteria, rows)


def test_example_study_date_and_time_between(target: Any) -> None:
    criteria = {
        "filters": [
            {
                "values": [
                    {
                        "DICOMStudyDateAndTime": {
                            "DICOMStudyDate": "19900101",
                            "DICOMStudyTime": "000000",
                        }
                    },
                    {
                        "DICOMStudyDateAndTime": {
                            "DICOMStudyDate": "20230101",
                            "DICOMStudyTime": "000000",
                        }
                    },
                ],
                "operator": "BETWEEN",
            }
        ]
    }
    rows = search_all(target, criteria)
    check(target, criteria, rows)
    if target.local:
        assert len(rows) > 100  # the generator dates most studies before 2023


def test_example_created_at_between(target: Any) -> None:
    doc = {
        "filters": [
            {
                "values": [
                    {"createdAt": "1985-04-12T23:20:50.52Z"},
                    {"createdAt": "2022-04-12T23:20:50.52Z"},
                ],
                "operator": "BETWEEN",
            }
        ]
    }
    check(target, doc, search_all(target, doc))
    # A window with hits: the three months around a sample's createdAt.
    created = sample(target)["createdAt"].astimezone(UTC)
    window = {
        "filters": [
            {
                "values": [
                    {"createdAt": created - timedelta(days=45)},
                    {"createdAt": created + timedelta(days=45)},
                ],
                "operator": "BETWEEN",
            }
        ]
    }
    rows = search_all(target, window)
    assert rows
    check(target, window, rows)


def test_example_series_uid_and_updated_at_sorted_asc(target: Any) -> None:
    record = sample(target, DICOMSeriesInstanceUID=True)
    updated = record["updatedAt"].astimezone(UTC)
    criteria = {
        "filters": [
            {
                "values": [
                    {"updatedAt": updated - timedelta(hours=1)},
                    {"updatedAt": updated + timedelta(hours=1)},
                ],
                "operator": "BETWEEN",
            },
            {
                "values": [
                    {"DICOMSeriesInstanceUID": record["DICOMTags"]["DICOMSeriesInstanceUID"]}
                ],
                "operator": "EQUAL",
            },
        ],
        "sort": {"sortField": "updatedAt", "sortOrder": "ASC"},
    }
    page = target.client.search_image_sets(datastoreId=target.datastore_id, searchCriteria=criteria)
    assert page["sort"] == {"sortField": "updatedAt", "sortOrder": "ASC"}
    rows = page["imageSetsMetadataSummaries"]
    assert record["imageSetId"] in ids(rows)
    stamps = [r["updatedAt"] for r in rows]
    assert stamps == sorted(stamps)
    check(target, criteria, rows)


# -- pagination and ordering -------------------------------------------------------------------


def test_pagination_to_exhaustion_no_duplicates_or_gaps(target: Any) -> None:
    rows = search_all(target, None, page_size=37)
    found = ids(rows)
    assert len(found) == len(set(found))
    if target.local:
        assert set(found) == {
            r["imageSetId"] for r in target.backend.image_sets(target.datastore_id)
        }
        assert found == expected_ids(target.backend.image_sets(target.datastore_id), None)


def test_default_page_is_50_and_sort_not_echoed(target: Any) -> None:
    page = target.client.search_image_sets(datastoreId=target.datastore_id)
    assert len(page["imageSetsMetadataSummaries"]) == 50
    assert "sort" not in page
    stamps = [r["updatedAt"] for r in page["imageSetsMetadataSummaries"]]
    assert stamps == sorted(stamps, reverse=True)


@pytest.mark.parametrize("field", ["updatedAt", "createdAt", "DICOMStudyDateAndTime"])
@pytest.mark.parametrize("order", ["ASC", "DESC"])
def test_sort_orders_match_reference(target: Any, field: str, order: str) -> None:
    if not target.local:
        pytest.skip("needs the ground truth of the local target")
    criteria = {"sort": {"sortField": field, "sortOrder": order}}
    rows = search_all(target, criteria)
    assert ids(rows) == expected_ids(target.backend.image_sets(target.datastore_id), criteria)


def test_timestamps_round_trip_with_microseconds(target: Any) -> None:
    if not target.local:
        pytest.skip("needs the ground truth of the local target")
    page = target.client.search_image_sets(datastoreId=target.datastore_id)[
        "imageSetsMetadataSummaries"
    ]
    truth = {r["imageSetId"]: r for r in target.backend.image_sets(target.datastore_id)}
    for row in page:
        for name in ("createdAt", "updatedAt", "lastAccessedAt"):
            assert row[name].astimezone(UTC) == truth[row["imageSetId"]][name]


# -- validation --------------------------------------------------------------------------------

UID = "1.2.826.0.1.3680043.8.498.1"
_EQ = {"values": [{"DICOMStudyInstanceUID": UID}], "operator": "EQUAL"}


def _between(attribute: str, low: Any, high: Any) -> dict[str, Any]:
    return {"values": [{attribute: low}, {attribute: high}], "operator": "BETWEEN"}


INVALID: dict[str, dict[str, Any]] = {
    "three filters": {
        "searchCriteria": {
            "filters": [_EQ, _between("createdAt", 0, 1), _between("updatedAt", 0, 1)]
        }
    },
    "maxResults 51": {"maxResults": 51},
    "UID with letters": {
        "searchCriteria": {
            "filters": [{"values": [{"DICOMStudyInstanceUID": "1.2.abc"}], "operator": "EQUAL"}]
        }
    },
    "UID with trailing dot": {
        "searchCriteria": {
            "filters": [{"values": [{"DICOMSeriesInstanceUID": "1.2."}], "operator": "EQUAL"}]
        }
    },
    "lower after upper": {
        "searchCriteria": {
            "filters": [_between("createdAt", datetime(2024, 1, 2), datetime(2024, 1, 1))]
        }
    },
    "two EQUAL values": {
        "searchCriteria": {
            "filters": [
                {"values": [{"DICOMPatientId": "A"}, {"DICOMPatientId": "B"}], "operator": "EQUAL"}
            ]
        }
    },
    "one BETWEEN value": {
        "searchCriteria": {
            "filters": [{"values": [{"createdAt": datetime(2024, 1, 1)}], "operator": "BETWEEN"}]
        }
    },
    "EQUAL on a date": {
        "searchCriteria": {
            "filters": [{"values": [{"createdAt": datetime(2024, 1, 1)}], "operator": "EQUAL"}]
        }
    },
    "BETWEEN on an id": {"searchCriteria": {"filters": [_between("DICOMPatientId", "A", "B")]}},
    "mixed attributes in a filter": {
        "searchCriteria": {
            "filters": [
                {
                    "values": [
                        {"createdAt": datetime(2024, 1, 1)},
                        {"updatedAt": datetime(2024, 1, 2)},
                    ],
                    "operator": "BETWEEN",
                }
            ]
        }
    },
    "study date 6 digits": {
        "searchCriteria": {
            "filters": [
                _between(
                    "DICOMStudyDateAndTime",
                    {"DICOMStudyDate": "900101"},
                    {"DICOMStudyDate": "20230101"},
                )
            ]
        }
    },
    "study date not a date": {
        "searchCriteria": {
            "filters": [
                _between(
                    "DICOMStudyDateAndTime",
                    {"DICOMStudyDate": "20230230"},
                    {"DICOMStudyDate": "20230301"},
                )
            ]
        }
    },
    "study time HHMM": {
        "searchCriteria": {
            "filters": [
                _between(
                    "DICOMStudyDateAndTime",
                    {"DICOMStudyDate": "20230101", "DICOMStudyTime": "1200"},
                    {"DICOMStudyDate": "20230301"},
                )
            ]
        }
    },
    "patient id over 512": {
        "searchCriteria": {
            "filters": [{"values": [{"DICOMPatientId": "X" * 513}], "operator": "EQUAL"}]
        }
    },
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_validation_rules(target: Any, case: str) -> None:
    with pytest.raises(ClientError) as caught:
        target.client.search_image_sets(datastoreId=target.datastore_id, **INVALID[case])
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_error_messages_do_not_echo_values(target: Any) -> None:
    secret = "9" * 30 + ".77."
    with pytest.raises(ClientError) as caught:
        target.client.search_image_sets(
            datastoreId=target.datastore_id,
            searchCriteria={
                "filters": [{"values": [{"DICOMSeriesInstanceUID": secret}], "operator": "EQUAL"}]
            },
        )
    message = caught.value.response["Error"]["Message"]
    assert message
    assert "9999" not in message
    if target.local:
        assert "filters[0].values[0]" in message


def test_forged_malformed_and_foreign_tokens(target: Any) -> None:
    first = target.client.search_image_sets(datastoreId=target.datastore_id, maxResults=5)
    token = first["nextToken"]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    foreign_criteria = {"sort": {"sortField": "createdAt", "sortOrder": "ASC"}}
    for bad, criteria in ((forged, None), ("not-a-token", None), (token, foreign_criteria)):
        kwargs: dict[str, Any] = {"datastoreId": target.datastore_id, "nextToken": bad}
        if criteria:
            kwargs["searchCriteria"] = criteria
        with pytest.raises(ClientError) as caught:
            target.client.search_image_sets(**kwargs)
        assert caught.value.response["Error"]["Code"] == "ValidationException"
    # The genuine token still works, with a different page size (maxResults is not bound).
    second = target.client.search_image_sets(
        datastoreId=target.datastore_id, maxResults=7, nextToken=token
    )
    assert len(second["imageSetsMetadataSummaries"]) == 7
    assert not set(ids(first["imageSetsMetadataSummaries"])) & set(
        ids(second["imageSetsMetadataSummaries"])
    )


def test_unknown_datastore_is_resource_not_found(target: Any) -> None:
    with pytest.raises(ClientError) as caught:
        target.client.search_image_sets(datastoreId="0" * 31 + "1")
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


# -- metadata ----------------------------------------------------------------------------------


def test_get_image_set_metadata_is_gzip_json(target: Any) -> None:
    record = sample(target, DICOMSeriesInstanceUID=True)
    response = target.client.get_image_set_metadata(
        datastoreId=target.datastore_id, imageSetId=record["imageSetId"]
    )
    assert response["contentEncoding"] == "gzip"
    assert response["contentType"].startswith("application/json")
    document = json.loads(gzip.decompress(response["imageSetMetadataBlob"].read()))
    assert document["ImageSetID"] == record["imageSetId"]
    series = document["Study"]["Series"]
    assert record["DICOMTags"]["DICOMSeriesInstanceUID"] in series
    if target.local:
        after = target.client.get_image_set(
            datastoreId=target.datastore_id, imageSetId=record["imageSetId"]
        )
        assert after["storageTier"] == "FREQUENT_ACCESS"


# -- throttling --------------------------------------------------------------------------------


def test_throttling_is_retried_by_standard_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """tps=5, burst=1: concurrent calls get 429s that botocore's standard mode retries."""

    def short_delay(self: Any, context: Any) -> float:
        # The real base is 1 s for throttles; keep the exponential shape, 1/20 of the scale.
        return random.random() * min(0.05 * 2 ** (context.attempt_number - 1), 1.0)

    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", short_delay)
    with LocalService.seeded(image_sets=60, seed=2, tps=5, burst=1) as service:
        local = threading.local()

        def call(_: int) -> int:
            if not hasattr(local, "client"):
                local.client = service.client()
            page = local.client.search_image_sets(datastoreId=service.datastore_id, maxResults=5)
            return page["ResponseMetadata"]["RetryAttempts"]

        with ThreadPoolExecutor(max_workers=3) as pool:
            attempts = list(pool.map(call, range(10)))
        stats = service.stats
    assert len(attempts) == 10
    assert stats.throttled > 0
    assert sum(attempts) == stats.throttled
    assert stats.by_operation["SearchImageSets"] == 10 + stats.throttled


# -- botocore's own paginator at scale ---------------------------------------------------------


@pytest.mark.slow
def test_botocore_paginator_exhausts_10000_image_sets() -> None:
    with LocalService.seeded(image_sets=10_000, seed=5) as service:
        paginator = service.client().get_paginator("search_image_sets")
        found = [
            row["imageSetId"]
            for page in paginator.paginate(datastoreId=service.datastore_id)
            for row in page["imageSetsMetadataSummaries"]
        ]
    assert len(found) == 10_000
    assert len(set(found)) == 10_000
