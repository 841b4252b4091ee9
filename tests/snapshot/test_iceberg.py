"""Iceberg snapshots pass the Delta matrix: round trip, time travel, refresh, writers, kills.

Catalogs: SQL on SQLite, REST (our small fixture: no REST catalog server installs from the
package registries), and Glue with S3 on moto's server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytest.importorskip("pyiceberg")

from healthimaging_df import Query
from healthimaging_df.errors import QueryValidationError, SnapshotConflictError, SnapshotError
from healthimaging_df.local import LocalService
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import (
    read_snapshot,
    scan_snapshot,
    snapshot_history,
    snapshot_info,
    snapshot_provenance,
    vacuum_snapshot,
    write_snapshot,
)

from .conftest import S3, typed_frame
from .iceberg_rest import serve

FAST = {"progress": False, "max_concurrency": 2, "max_tps": None}


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.sort_values("imageSetId").reset_index(drop=True)
    out.attrs = {}
    return out


@pytest.fixture(params=["sql", "rest", "glue"])
def catalog(
    request: pytest.FixtureRequest, tmp_path: Path, moto_s3: S3
) -> Iterator[dict[str, Any]]:
    """Where an Iceberg table lives, as the keyword arguments every snapshot function takes."""
    if request.param == "sql":
        yield {"catalog": f"sqlite:///{tmp_path}/catalog.db", "warehouse": str(tmp_path / "wh")}
    elif request.param == "rest":
        server = serve(f"sqlite:///{tmp_path}/rest.db", f"file://{tmp_path}/wh")
        try:
            yield {"catalog": f"http://127.0.0.1:{server.server_address[1]}"}
        finally:
            server.shutdown()
            server.server_close()
    else:
        bucket = moto_s3.bucket()
        yield {"catalog": "glue", "warehouse": f"s3://{bucket}/wh", **moto_s3.options()}


def test_round_trip_time_travel_and_history(catalog: dict[str, Any]) -> None:
    first = typed_frame(300, seed=1)
    second = typed_frame(200, seed=2)
    where = {"iceberg_table": "cohorts.ct", **catalog}
    one = write_snapshot(first, partition_cols=["Modality"], **where)
    assert (one.format, one.rows, one.partition_cols) == ("iceberg", len(first), ("Modality",))
    back = read_snapshot(**where)
    pd.testing.assert_frame_equal(_plain(back), _plain(first))  # every dtype and value
    assert back.attrs["healthimaging_df"]["datastore_id"] == "f" * 32
    two = write_snapshot(second, partition_cols=["Modality"], **where)
    assert two.partition_cols == ("Modality",)
    pd.testing.assert_frame_equal(_plain(read_snapshot(**where)), _plain(second))

    history = snapshot_history(**where)
    assert history["operation"].tolist() == ["WRITE", "WRITE"]
    assert history["version"].tolist() == [two.version, one.version]
    pd.testing.assert_frame_equal(
        _plain(read_snapshot(version=one.version, **where)), _plain(first)
    )
    moment = history["timestamp"].iloc[-1].to_pydatetime()
    pd.testing.assert_frame_equal(_plain(read_snapshot(as_of=moment, **where)), _plain(first))
    assert snapshot_provenance(version=one.version, **where)["row_count"] == len(first)
    chunks = list(read_snapshot(chunk_rows=64, **where))
    assert sum(len(c) for c in chunks) == len(second)
    assert max(len(c) for c in chunks) <= 64
    assert scan_snapshot(**where).count_rows() == len(second)
    info = snapshot_info(**where)
    assert (info.format, info.rows, info.protocol) == (
        "iceberg",
        len(second),
        {"format_version": 2},
    )

    with pytest.raises(SnapshotError, match="no such version"):
        read_snapshot(version=12345, **where)
    assert vacuum_snapshot(retain=pd.Timedelta(0).to_pytimedelta(), dry_run=False, **where) > 0
    with pytest.raises(SnapshotError, match="no such version"):
        read_snapshot(version=one.version, **where)  # expired
    pd.testing.assert_frame_equal(_plain(read_snapshot(**where)), _plain(second))


def test_naming_the_table_is_checked_before_anything(tmp_path: Path) -> None:
    frame = typed_frame(5)
    for kwargs, field in (
        ({"iceberg_table": "nodot", "catalog": "sqlite:///x.db"}, "iceberg_table"),
        ({"iceberg_table": "a.b"}, "catalog"),
        ({"iceberg_table": "a.b", "catalog": "ftp://x"}, "catalog"),
        ({"catalog": "sqlite:///x.db"}, "catalog"),
    ):
        with pytest.raises(QueryValidationError) as caught:
            write_snapshot(frame, **kwargs)  # type: ignore[arg-type]
        assert caught.value.field == field
    with pytest.raises(QueryValidationError, match="warehouse"):
        write_snapshot(frame, iceberg_table="a.b", catalog=f"sqlite:///{tmp_path}/c.db")
    assert not (tmp_path / "c.db").exists() or (tmp_path / "c.db").stat().st_size >= 0


def test_export_and_refresh_equal_a_fresh_export(
    ahi_service_factory: Callable[..., LocalService], tmp_path: Path
) -> None:
    service = ahi_service_factory(image_sets=300, seed=21)
    client = service.client()
    query = Query(service.datastore_id).where(isPrimary=True)
    where = {
        "iceberg_table": "cohorts.primary",
        "catalog": f"sqlite:///{tmp_path}/c.db",
        "warehouse": str(tmp_path / "wh"),
    }
    info = query.to_iceberg(
        where["iceberg_table"],
        catalog=where["catalog"],
        warehouse=where["warehouse"],
        client=client,
        partition_cols=["Modality"],
        **FAST,
    )
    assert info.format == "iceberg"
    pd.testing.assert_frame_equal(
        _plain(read_snapshot(**where)), _plain(query.to_dataframe(client=client, **FAST))
    )
    ids = [s["imageSetId"] for s in service.backend.image_sets(service.datastore_id)]
    service.backend.update_image_set(service.datastore_id, ids[0], is_primary=False)
    service.backend.update_image_set(
        service.datastore_id, ids[1], tags={"DICOMSeriesModality": "ZZ"}
    )
    report = refresh_snapshot(client=client, **where, **FAST)
    assert report.changed
    pd.testing.assert_frame_equal(
        _plain(read_snapshot(**where)), _plain(query.to_dataframe(client=client, **FAST))
    )
    history = snapshot_history(**where)
    assert history["operation"].tolist()[0] == "MERGE"
    before = len(history)
    quiet = refresh_snapshot(client=client, **where, **FAST)  # nothing changed: no snapshot
    assert not quiet.changed
    assert len(snapshot_history(**where)) == before


_WRITER = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa
    from healthimaging_df.errors import SnapshotConflictError
    from healthimaging_df.store.iceberg import IcebergFormat, IcebergTarget

    spec, writer, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if spec.pop("moto", None):
        import boto3
        spec["boto3_session"] = boto3.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )
    table = IcebergFormat(IcebergTarget("shared.t", **spec))
    done, lost = [], 0
    for number in range(rounds):
        rows = 10 + writer * 100 + number
        data = pa.table({
            "imageSetId": [f"{writer}-{number}-{i}" for i in range(rows)],
            "writer": [writer] * rows,
            "round": [number] * rows,
        })
        try:
            done.append([number, table.write(data, {"writer": writer, "round": number}).version])
        except SnapshotConflictError:
            lost += 1
    print(json.dumps({"done": done, "lost": lost}))
    """
)


@pytest.mark.parametrize("kind", ["sql", "glue"])
def test_two_writers_never_corrupt_the_table(tmp_path: Path, moto_s3: S3, kind: str) -> None:
    from healthimaging_df.store.iceberg import IcebergFormat, IcebergTarget

    if kind == "sql":
        spec: dict[str, Any] = {"catalog": f"sqlite:///{tmp_path}/c.db", "warehouse": str(tmp_path)}
        local: dict[str, Any] = dict(spec)
    else:
        spec = {
            "catalog": "glue",
            "warehouse": f"s3://{moto_s3.bucket()}/wh",
            "s3_endpoint_url": moto_s3.endpoint_url,
            "moto": True,
        }
        local = {k: v for k, v in spec.items() if k != "moto"}
        local["boto3_session"] = moto_s3.session
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, json.dumps(spec), str(w), "6"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        )
        for w in (1, 2)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out))
    assert sum(len(r["done"]) for r in results) >= 1
    table = IcebergFormat(IcebergTarget("shared.t", **local))
    latest = table.read()
    pairs = set(
        zip(
            latest.table.column("writer").to_pylist(),
            latest.table.column("round").to_pylist(),
            strict=True,
        )
    )
    assert len(pairs) == 1  # one writer's whole version, never a mix
    ((writer, number),) = pairs
    assert latest.table.num_rows == 10 + writer * 100 + number
    for snapshot_id in table.history()["version"]:  # every version is one writer's, whole
        old = table.read(version=int(snapshot_id)).table
        assert len(set(old.column("writer").to_pylist())) == 1


_KILLED = textwrap.dedent(
    """
    import sys, time, pathlib
    from healthimaging_df.store.iceberg import table as module
    from healthimaging_df.snapshot import write_snapshot, read_snapshot
    from healthimaging_df.refresh import refresh_snapshot

    real = module.IcebergFormat._files_of
    marker = pathlib.Path(sys.argv[2])

    def slow(self, *args, **kwargs):
        for item in real(self, *args, **kwargs):
            yield item
            marker.write_text("files written")
            time.sleep(60)  # killed here: data files written, nothing committed

    module.IcebergFormat._files_of = slow
    where = {"iceberg_table": "cohorts.k", "catalog": sys.argv[1] + "/c.db", "warehouse": sys.argv[3]}
    frame = read_snapshot(**where)
    if sys.argv[4] == "export":
        write_snapshot(frame.iloc[:10], **where)
    else:
        from healthimaging_df.store.iceberg import IcebergFormat, IcebergTarget
        import pyarrow as pa, pyarrow.compute as pc
        fmt = IcebergFormat(IcebergTarget(where["iceberg_table"], where["catalog"], where["warehouse"]))
        current = fmt.read()
        changed = current.table.slice(0, 3)
        changed = changed.set_column(1, "version", pc.add(changed["version"], 1))
        fmt.merge(changed, [], {"killed": True}, expected_version=current.version)
    """
)


@pytest.mark.parametrize("step", ["export", "refresh"])
def test_sigkill_leaves_the_previous_snapshot(tmp_path: Path, step: str) -> None:
    frame = typed_frame(200, seed=4)
    where = {
        "iceberg_table": "cohorts.k",
        "catalog": f"sqlite:///{tmp_path}/c.db",
        "warehouse": str(tmp_path / "wh"),
    }
    before = write_snapshot(frame, partition_cols=["Modality"], **where)
    marker = tmp_path / "marker"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLED,
            f"sqlite:///{tmp_path}",
            str(marker),
            str(tmp_path / "wh"),
            step,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, (
                child.stderr.read().decode()[-2000:] if child.stderr else ""
            )
            assert time.monotonic() < deadline, "the child wrote no file"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert snapshot_info(**where).version == before.version
    pd.testing.assert_frame_equal(_plain(read_snapshot(**where)), _plain(frame))
    # the killed writer's files are debris: expiry removes them, the snapshot stays whole
    assert vacuum_snapshot(retain=pd.Timedelta(0).to_pytimedelta(), dry_run=False, **where) >= 1
    pd.testing.assert_frame_equal(_plain(read_snapshot(**where)), _plain(frame))


def test_a_conflicting_merge_is_typed(tmp_path: Path) -> None:
    from healthimaging_df.store.iceberg import IcebergFormat, IcebergTarget

    table = IcebergFormat(IcebergTarget("a.b", f"sqlite:///{tmp_path}/c.db", str(tmp_path)))
    frame = typed_frame(50, seed=3)
    from healthimaging_df.store.tables import frame_to_table

    first = table.write(frame_to_table(frame), {"n": 1})
    table.write(frame_to_table(frame.iloc[:5]), {"n": 2})  # someone else, meanwhile
    with pytest.raises(SnapshotConflictError, match="another writer"):
        table.merge(frame_to_table(frame.iloc[:1]), [], {"n": 3}, expected_version=first.version)
    assert table.read().provenance == {"n": 2, **{}} or table.read().provenance["n"] == 2
