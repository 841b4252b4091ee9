"""The shared definitions: argument checks, our timestamps, the pandas mapper, quotas, errors, retries."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from healthimaging_df import Query, aws, schema
from healthimaging_df.core import checks, dates
from healthimaging_df.core.frames import PROVENANCE_KEY, provenance_datastore, provenance_of
from healthimaging_df.errors import QueryValidationError, SearchError, ThrottledError

DS = "0" * 32


# -- argument checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False, 0, -3, 1.0, "2", None])
def test_positive_int_refuses_bools_and_the_rest(value: Any) -> None:
    with pytest.raises(QueryValidationError, match=r"^n: must be a positive integer$"):
        checks.positive_int("n", value)


def test_integer_checks_return_what_they_accept() -> None:
    assert checks.positive_int("n", 3) == 3
    assert checks.optional_positive_int("n", None) is None
    assert checks.non_negative_int("n", 0) == 0
    assert checks.integer("page_size", 50, minimum=1, maximum=50) == 50
    with pytest.raises(QueryValidationError, match="from 1 to 50"):
        checks.integer("page_size", 51, minimum=1, maximum=50)
    with pytest.raises(QueryValidationError, match="or None"):
        checks.optional_positive_int("n", 0)


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None])
def test_flag_takes_bools_only(value: Any) -> None:
    with pytest.raises(QueryValidationError, match=r"^ascending: must be True or False$"):
        checks.flag("ascending", value)
    assert checks.flag("ascending", False) is False


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), True, "25"])
def test_rates_are_finite_positive_numbers(value: Any) -> None:
    with pytest.raises(QueryValidationError, match="max_tps: must be a positive number or None"):
        checks.optional_positive_number("max_tps", value)
    assert checks.optional_positive_number("max_tps", None) is None
    assert checks.optional_positive_number("max_tps", 12) == 12.0


def test_one_of_names_the_choices() -> None:
    assert checks.one_of("on_error", "report", ("raise", "report")) == "report"
    with pytest.raises(QueryValidationError, match=r"^on_error: must be 'raise' or 'report'$"):
        checks.one_of("on_error", "ignore", ("raise", "report"))


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda q: q.sort_by("createdAt", ascending="no"), "ascending"),
        (lambda q: q.sort_by("createdAt", ascending=0), "ascending"),
        (lambda q: q.contains("PatientName", "DOE", case="no"), "case"),
        (lambda q: q.matches("PatientName", "^D", case="no"), "case"),
    ],
)
def test_query_flags_are_bools_only(build: Any, field: str) -> None:
    """Issue 26: the string "no" was read as True."""
    with pytest.raises(QueryValidationError) as info:
        build(Query(DS))
    assert info.value.field == field


# -- our own timestamps ---------------------------------------------------------------------------


def test_read_iso_is_aware_and_naive_means_utc() -> None:
    assert dates.read_iso("2024-01-02T03:04:05") == datetime(
        2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc
    )
    moment = dates.read_iso("2024-01-02T03:04:05+02:00")
    assert moment.utcoffset() is not None
    assert dates.read_iso_or_none(None) is None


@pytest.mark.parametrize("text", ["yesterday", "", 5, b"2024-01-01"])
def test_read_iso_raises_one_typed_error_without_the_value(text: Any) -> None:
    with pytest.raises(dates.TimestampError) as info:
        dates.read_iso(text)
    assert "yesterday" not in str(info.value)
    assert isinstance(info.value, ValueError)


# -- the pandas type mapper -----------------------------------------------------------------------


def test_one_pandas_mapper_for_every_frame() -> None:
    table = pa.table(
        {
            "s": pa.array(["a", None]),
            "i": pa.array([1, None], pa.int32()),
            "b": pa.array([True, None]),
            "f": pa.array([1.5, None]),
            "d": pa.array([None, None], pa.date32()),
            "l": pa.array([["x"], None], pa.list_(pa.string())),
        }
    )
    frame = table.to_pandas(types_mapper=schema.pandas_type)
    assert frame["s"].dtype == pd.StringDtype("pyarrow")
    assert frame["i"].dtype == pd.Int64Dtype()
    assert frame["b"].dtype == pd.BooleanDtype()
    assert frame["f"].dtype == pd.Float64Dtype()
    assert isinstance(frame["d"].dtype, pd.ArrowDtype)
    assert isinstance(frame["l"].dtype, pd.ArrowDtype)


# -- provenance -----------------------------------------------------------------------------------


def test_provenance_key_lives_at_the_bottom_layer() -> None:
    from healthimaging_df.engine import provenance
    from healthimaging_df.snapshot import METADATA_KEY

    assert provenance.KEY == METADATA_KEY == PROVENANCE_KEY
    frame = pd.DataFrame()
    assert provenance_of(frame) is None
    assert provenance_datastore(frame) is None
    frame.attrs[PROVENANCE_KEY] = {"datastore_id": DS}
    assert provenance_datastore(frame) == DS


# -- quotas ---------------------------------------------------------------------------------------


def test_default_quotas_per_operation() -> None:
    assert aws.SEARCH_TPS == aws.default_tps("SearchImageSets") == 25.0
    assert aws.METADATA_TPS == aws.default_tps("GetImageSetMetadata") == 50.0
    assert aws.default_tps("SearchDICOMStudies") == aws.QIDO_TPS


def test_signatures_take_their_default_from_the_quota_table() -> None:
    import inspect

    from healthimaging_df import metadata

    assert inspect.signature(Query.to_dataframe).parameters["max_tps"].default == aws.SEARCH_TPS
    got = inspect.signature(metadata.fetch_metadata).parameters["max_tps"].default
    assert got == aws.METADATA_TPS


# -- error translation ----------------------------------------------------------------------------


def _client_error(code: str, status: int, message: str = "PatientID P1 is bad") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "SearchImageSets")


def test_service_error_is_typed_and_withholds_botocore_text() -> None:
    error = aws.service_error("SearchImageSets", 3, _client_error("ThrottlingException", 400))
    assert isinstance(error, ThrottledError)
    assert "P1" not in str(error)
    assert error.server_message == "PatientID P1 is bad"
    plain = aws.service_error("SearchImageSets", None, _client_error("ValidationException", 400))
    assert type(plain) is SearchError
    assert plain.status == 400
    throttled_by_status = aws.service_error("X", None, _client_error("Weird", 429))
    assert isinstance(throttled_by_status, ThrottledError)


def test_connection_errors_keep_only_their_kind() -> None:
    exc = EndpointConnectionError(endpoint_url="https://runtime-x/datastore/P1")
    found = aws.failure(exc)
    assert found.code == "EndpointConnectionError"
    assert found.fatal
    assert aws.describe(exc) == "AWS SDK error: EndpointConnectionError"
    assert aws.describe(_client_error("ValidationException", 400)) == (
        "SearchImageSets failed with ValidationException"
    )


def test_http_failure_reads_the_code_as_botocore_does() -> None:
    found = aws.http_failure(403, {"x-amzn-ErrorType": "AccessDeniedException:http://x#y"})
    assert found.code == "AccessDeniedException"
    assert found.fatal
    assert aws.http_failure(503, {}).code == "HTTP503"
    assert aws.http_failure(429, {}).throttled


# -- retry with backoff ---------------------------------------------------------------------------


def test_retrying_retries_what_it_is_told_and_no_more() -> None:
    calls: list[int] = []
    waits: list[float] = []

    def flaky(attempt: int) -> str:
        calls.append(attempt)
        if attempt < 3:
            raise ValueError("again")
        return "done"

    policy = aws.Backoff(attempts=5, base=0.1, cap=0.15)
    got = aws.retrying(
        flaky, retry_if=lambda e: isinstance(e, ValueError), backoff=policy, wait=waits.append
    )
    assert got == "done"
    assert calls == [1, 2, 3]
    assert len(waits) == 2
    assert all(0 <= w <= 0.15 for w in waits)

    calls.clear()
    with pytest.raises(ValueError, match="again"):
        aws.retrying(
            flaky, retry_if=lambda e: True, backoff=aws.Backoff(2, 0, 0), wait=waits.append
        )
    assert calls == [1, 2]
    calls.clear()
    with pytest.raises(ValueError, match="again"):
        aws.retrying(flaky, retry_if=lambda e: False, backoff=policy, wait=waits.append)
    assert calls == [1]


def test_retrying_stops_when_its_wait_is_cancelled() -> None:
    cancel = threading.Event()
    cancel.set()

    def fails(_: int) -> None:
        raise ValueError

    with pytest.raises(aws.RetryCancelled):
        aws.retrying(fails, retry_if=lambda e: True, backoff=aws.MALFORMED, wait=cancel.wait)


def test_fetch_metadata_dry_run_is_a_flag() -> None:
    """Issue 26: ``dry_run="no"`` was read as yes (and returned a plan instead of a frame)."""
    from healthimaging_df.metadata import fetch_metadata

    frame = pd.DataFrame(
        {"imageSetId": ["a" * 32], "version": [1], "PatientID": ["P"], "StudyInstanceUID": ["1"]}
    )
    with pytest.raises(QueryValidationError) as info:
        fetch_metadata(frame, dry_run="no")  # type: ignore[call-overload]
    assert info.value.field == "dry_run"
    with pytest.raises(QueryValidationError) as info:
        frame.ahi.fetch_metadata(dry_run="no")
    assert info.value.field == "dry_run"
