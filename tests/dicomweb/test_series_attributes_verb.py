"""``df.ahi.fetch_series_attributes`` and the ``series-attributes`` command, over loopback HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

import healthimaging_df  # noqa: F401  (registers df.ahi)
from healthimaging_df import Query
from healthimaging_df.dicomweb import ENV_VAR
from healthimaging_df.local import LocalService
from tests.dicomweb.conftest import dicomweb_url

ROOT = Path(__file__).resolve().parents[2]


def test_accessor_joins_series_attributes_without_an_access(ahi_local: LocalService) -> None:
    client = ahi_local.client()
    frame = (
        Query(ahi_local.datastore_id)
        .where(Modality="MG")
        .to_dataframe(client=client, progress=False, max_tps=None)
    )
    assert len(frame)
    ahi_local.reset_stats()
    enriched = frame.ahi.fetch_series_attributes(["SeriesDescription"], client=client, max_tps=None)
    assert list(enriched["imageSetId"]) == list(frame["imageSetId"])
    assert enriched["SeriesDescription"].notna().any()
    operations = ahi_local.stats.by_operation
    assert "GetImageSetMetadata" not in operations
    assert operations["SearchDICOMSeries"] == frame["StudyInstanceUID"].nunique()


def test_series_attributes_command(ahi_local: LocalService, tmp_path: Path) -> None:
    out = tmp_path / "series.csv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(ahi_local.env())
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault(ENV_VAR, dicomweb_url(ahi_local))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "healthimaging_df",
            "series-attributes",
            "--datastore-id",
            str(ahi_local.datastore_id),
            "--where",
            "Modality=MG",
            "--field",
            "SeriesDescription",
            "--field",
            "Manufacturer",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = pd.read_csv(out)
    assert {"SeriesDescription", "Manufacturer", "imageSetId"} <= set(written.columns)
    assert (written["Modality"] == "MG").all()
    assert len(written) > 0
