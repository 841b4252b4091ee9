"""``--out s3://`` and ``--from s3://``: every format to and from moto's S3 server on loopback.

The entry point runs in a subprocess pointed at the session's local service and at moto's S3 (by
``AWS_ENDPOINT_URL_S3`` or ``--s3-endpoint-url``). Nothing may land on the local disk.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from healthimaging_df.cli.commands import remote
from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import read_snapshot
from tests.snapshot.conftest import S3

from .conftest import Run, clean_env, one_error_line, row, runner

ARCHIVED = "ARCHIVE_INSTANT_ACCESS"


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 (as tests/snapshot/conftest.py starts it)."""
    import logging

    from moto.server import ThreadedMotoServer

    # moto's own request log (werkzeug) is the stand-in's server log, not the client's: off.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3(f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def bucket(moto_s3: S3) -> str:
    """A bucket no other test module names: moto's servers in one process share their state.

    ``S3.bucket`` counts from 1 in each module, so its names collide across modules.
    """
    name = f"cli-out-{uuid.uuid4().hex[:12]}"
    moto_s3.client.create_bucket(Bucket=name)
    return name


def s3_cli(service: LocalService, cwd: Path, moto_s3: S3, *, env_endpoint: bool = True) -> Run:
    """The entry point against *service*, with S3 at moto by AWS_ENDPOINT_URL_S3 (or not)."""
    extra = dict(service.env())
    if env_endpoint:
        extra["AWS_ENDPOINT_URL_S3"] = moto_s3.endpoint_url
    base = runner(service, cwd)

    def run(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Any:
        return base(*args, env=env if env is not None else clean_env(extra), input=input)

    return run


def keys(moto_s3: S3, bucket: str) -> list[str]:
    listed = moto_s3.client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def body(moto_s3: S3, bucket: str, key: str) -> bytes:
    data: bytes = moto_s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def nothing_local(cwd: Path) -> None:
    assert sorted(p.name for p in cwd.iterdir()) == []  # no ./s3:/bucket/... on local disk


def ct_ids(service: LocalService) -> set[str]:
    assert service.datastore_id is not None
    records = service.backend.image_sets(service.datastore_id)
    return {r["imageSetId"] for r in records if row(r)["Modality"] == "CT"}


@pytest.mark.parametrize(
    ("name", "extra", "env_endpoint"),
    [
        ("ct.csv", (), True),  # streamed
        ("ct.jsonl", (), False),  # streamed, endpoint from --s3-endpoint-url
        ("ct.ndjson", ("--sort", "createdAt"), True),  # whole frame, then one upload
    ],
)
def test_search_writes_text_formats_to_s3(
    service: LocalService,
    tmp_path: Path,
    moto_s3: S3,
    bucket: str,
    name: str,
    extra: tuple[str, ...],
    env_endpoint: bool,
) -> None:
    run = s3_cli(service, tmp_path, moto_s3, env_endpoint=env_endpoint)
    url = f"s3://{bucket}/cohorts/{name}"
    endpoint = () if env_endpoint else ("--s3-endpoint-url", moto_s3.endpoint_url)
    result = run(
        "search", "--datastore-id", str(service.datastore_id), "--where", "Modality=CT",
        "--out", url, *extra, *endpoint,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = ct_ids(service)
    assert result.stderr.strip() == f"{len(expected)} image sets -> {url}"
    nothing_local(tmp_path)
    assert keys(moto_s3, bucket) == [f"cohorts/{name}"]
    data = body(moto_s3, bucket, f"cohorts/{name}")
    if name.endswith(".csv"):
        frame = pd.read_csv(io.BytesIO(data), dtype=str)
    else:
        frame = pd.DataFrame([json.loads(line) for line in data.decode().splitlines()])
    assert set(frame["imageSetId"]) == expected
    assert len(frame) == len(expected)
    assert frame["PatientID"].notna().all()
    if extra:  # --sort createdAt: the query's order
        assert frame["createdAt"].tolist() == sorted(frame["createdAt"])
    assert moto_s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_search_writes_parquet_snapshots_and_rollups_to_s3(
    service: LocalService, tmp_path: Path, moto_s3: S3, bucket: str
) -> None:
    run = s3_cli(service, tmp_path, moto_s3)
    datastore = str(service.datastore_id)
    snapshot = f"s3://{bucket}/ct.parquet"
    result = run("search", "--datastore-id", datastore, "--where", "Modality=CT", "--out", snapshot)
    assert result.returncode == 0, result.stderr
    frame = read_snapshot(snapshot, **moto_s3.options())
    assert set(frame["imageSetId"]) == ct_ids(service)
    assert frame.attrs["healthimaging_df"]["datastore_id"] == datastore  # typed, with provenance
    studies = f"s3://{bucket}/studies.parquet"
    result = run("search", "--datastore-id", datastore, "--per", "study", "--out", studies)
    assert result.returncode == 0, result.stderr
    rollup = pq.read_table(io.BytesIO(body(moto_s3, bucket, "studies.parquet")))
    study_uids = rollup.column("StudyInstanceUID").to_pylist()
    assert len(set(study_uids)) == len(study_uids) == int(result.stderr.split()[0])
    nothing_local(tmp_path)


def test_a_missing_bucket_fails_before_the_search(
    service: LocalService, tmp_path: Path, moto_s3: S3
) -> None:
    run = s3_cli(service, tmp_path, moto_s3)
    service.reset_stats()
    result = run(
        "search", "--datastore-id", str(service.datastore_id), "--where", "Modality=CT",
        "--out", "s3://no-such-bucket-here/ct.csv",
    )  # fmt: skip
    assert result.returncode == 1
    assert "NoSuchBucket" in one_error_line(result.stderr)
    assert service.stats.by_operation.get("SearchImageSets", 0) == 0  # streamed: upload first
    nothing_local(tmp_path)


@pytest.mark.parametrize("url", ["s3://", "s3://bucket-only", "s3://bucket/folder/"])
def test_an_s3_url_without_a_key_is_a_usage_error(
    service: LocalService, tmp_path: Path, moto_s3: S3, url: str
) -> None:
    service.reset_stats()
    result = s3_cli(service, tmp_path, moto_s3)(
        "search", "--datastore-id", str(service.datastore_id), "--format", "csv", "--out", url
    )
    assert result.returncode == 2
    assert "needs a bucket and a key" in one_error_line(result.stderr)
    assert service.stats.requests == 0


def test_a_failed_upload_leaves_no_object_and_no_parts(
    moto_s3: S3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings = remote.S3Settings(endpoint_url=moto_s3.endpoint_url)

    def half_then_fail() -> None:
        with remote.upload_text(f"s3://{bucket}/half.csv", settings) as handle:
            handle.write("imageSetId\n" + "a" * (9 * 1024 * 1024) + "\n")  # one part sent
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        half_then_fail()
    assert keys(moto_s3, bucket) == []
    assert moto_s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_large_outputs_go_up_in_parts(
    moto_s3: S3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings = remote.S3Settings(endpoint_url=moto_s3.endpoint_url)
    text = "".join(f"{i:07d},ü\n" for i in range(1_300_000))  # 13 MB: two parts
    with remote.upload_text(f"s3://{bucket}/big.csv", settings) as handle:
        for start in range(0, len(text), 1_000_000):
            handle.write(text[start : start + 1_000_000])
    head = moto_s3.client.head_object(Bucket=bucket, Key="big.csv")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart object of two parts
    assert body(moto_s3, bucket, "big.csv").decode("utf-8") == text
    remote.put(f"s3://{bucket}/empty.jsonl", b"", settings)
    assert body(moto_s3, bucket, "empty.jsonl") == b""


def test_metadata_reads_from_and_writes_to_s3(tmp_path: Path, moto_s3: S3, bucket: str) -> None:
    with LocalService.seeded(image_sets=120, seed=11) as small:
        run = s3_cli(small, tmp_path, moto_s3)
        assert small.datastore_id is not None
        records = small.backend.image_sets(small.datastore_id)
        frequent = [r for r in records if r["storageTier"] == "FREQUENT_ACCESS"][:6]
        cohort = pd.DataFrame({"imageSetId": [r["imageSetId"] for r in frequent]})
        moto_s3.client.put_object(
            Bucket=bucket, Key="in/cohort.csv", Body=cohort.to_csv(index=False).encode()
        )
        small.reset_stats()
        result = run(
            "metadata", "--from", f"s3://{bucket}/in/cohort.csv",
            "--datastore-id", small.datastore_id, "--out", f"s3://{bucket}/out/series.jsonl",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        # no storageTier in the file: each tier is looked up first (not an access), none archived
        assert small.stats.by_operation.get("GetImageSet") == 6
        assert small.stats.by_operation.get("GetImageSetMetadata") == 6
        lines = body(moto_s3, bucket, "out/series.jsonl").decode().splitlines()
        series = [json.loads(line) for line in lines]
        assert [s["imageSetId"] for s in series] == cohort["imageSetId"].tolist()
        expected = [r["DICOMTags"]["DICOMSeriesInstanceUID"] for r in frequent]
        assert [s["SeriesInstanceUID"] for s in series] == expected

        missing = run(
            "metadata", "--from", f"s3://{bucket}/in/none.csv", "--datastore-id",
            small.datastore_id,
        )  # fmt: skip
        assert missing.returncode == 2
        assert one_error_line(missing.stderr).endswith(f"no such object: s3://{bucket}/in/none.csv")
    nothing_local(tmp_path)


def test_metadata_from_a_parquet_snapshot_on_s3(
    service: LocalService, tmp_path: Path, moto_s3: S3, bucket: str
) -> None:
    run = s3_cli(service, tmp_path, moto_s3)
    datastore = str(service.datastore_id)
    cohort = f"s3://{bucket}/mr.parquet"
    search = run(
        "search", "--datastore-id", datastore, "--where", "Modality=MR",
        "--where", "storageTier=FREQUENT_ACCESS", "--limit", "4", "--out", cohort,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr
    service.reset_stats()
    result = run("metadata", "--from", cohort, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would make 4 GetImageSetMetadata call(s)" in result.stdout
    assert "looked up" not in result.stdout  # a fresh snapshot's tiers are current
    assert service.stats.requests == 0


def test_archived_image_sets_the_file_does_not_show_are_refused(
    tmp_path: Path, moto_s3: S3, bucket: str
) -> None:
    with LocalService.seeded(image_sets=120, seed=11) as small:
        run = s3_cli(small, tmp_path, moto_s3)
        assert small.datastore_id is not None
        archived = [
            r for r in small.backend.image_sets(small.datastore_id) if r["storageTier"] == ARCHIVED
        ][:5]
        assert len(archived) == 5
        before = {r["imageSetId"]: (r["storageTier"], r["lastAccessedAt"]) for r in archived}
        ids = "imageSetId\n" + "".join(f"{i}\n" for i in before)
        moto_s3.client.put_object(Bucket=bucket, Key="archived.csv", Body=ids.encode())
        small.reset_stats()
        result = run(
            "metadata", "--from", f"s3://{bucket}/archived.csv",
            "--datastore-id", small.datastore_id,
        )  # fmt: skip
        assert result.returncode == 2
        line = one_error_line(result.stderr)
        assert "allow_archive_access: 5 of 5 image sets are archived" in line
        assert "--allow-archive-access" in line
        assert small.stats.by_operation.get("GetImageSet") == 5
        assert small.stats.by_operation.get("GetImageSetMetadata", 0) == 0
        after = {
            r["imageSetId"]: (r["storageTier"], r["lastAccessedAt"])
            for r in small.backend.image_sets(small.datastore_id)
            if r["imageSetId"] in before
        }
        assert after == before

        allowed = run(
            "metadata", "--from", f"s3://{bucket}/archived.csv",
            "--datastore-id", small.datastore_id, "--allow-archive-access", "--out", "s.csv",
        )  # fmt: skip
        assert allowed.returncode == 0, allowed.stderr
        assert "5 of 5 have no current storageTier" in allowed.stderr
        assert small.stats.by_operation.get("GetImageSet") == 5  # no more look-ups
        assert small.stats.by_operation.get("GetImageSetMetadata") == 5
        moved = {
            r["imageSetId"]: r["storageTier"] for r in small.backend.image_sets(small.datastore_id)
        }
        assert {moved[i] for i in before} == {"FREQUENT_ACCESS"}


@pytest.mark.slow  # three commands, about 10 s
def test_verbose_s3_work_logs_no_phi(tmp_path: Path, moto_s3: S3, bucket: str) -> None:
    with LocalService.seeded(image_sets=120, seed=5) as small:  # metadata accesses change tiers
        assert small.datastore_id is not None
        run = s3_cli(small, tmp_path, moto_s3)
        datastore = small.datastore_id
        records = small.backend.image_sets(datastore)
        phi = {
            value
            for r in records
            for value in (row(r)["PatientID"], row(r)["PatientName"], row(r)["StudyInstanceUID"])
            if value and len(value) >= 6
        }
        phi |= {r["DICOMTags"]["DICOMSeriesInstanceUID"] for r in records}
        outputs = [
            ("snapshot", f"s3://{bucket}/by-patient", "--partition-by", "PatientID",
             "--datastore-id", datastore),
            ("search", "--datastore-id", datastore, "--where", "Modality=CT",
             "--out", f"s3://{bucket}/ct.csv"),
            ("metadata", "--from", f"s3://{bucket}/ct.csv", "--datastore-id", datastore,
             "--level", "instance", "--allow-archive-access", "--out", f"s3://{bucket}/i.jsonl"),
        ]  # fmt: skip
        for args in outputs:
            result = run("-vv", *args)
            assert result.returncode == 0, result.stderr[-2000:]
            log = result.stderr
            assert "Calling endpoint provider with parameters" in log  # botocore's S3 log is on
            assert "PutObject" in log or "UploadPart" in log
            leaked = sorted(v for v in phi if v in log)
            assert leaked == [], (args[0], leaked[:3])
    written = keys(moto_s3, bucket)
    assert any(k.startswith("by-patient/PatientID=") for k in written)  # keys do hold PHI
