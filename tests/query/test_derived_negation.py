"""``where_not`` on a derived value (ageAtStudy, StudyYear): exact, alone and in a union."""

from __future__ import annotations

from typing import Any

import pandas as pd

from healthimaging_df import Query
from healthimaging_df.local import LocalService

FAST: dict[str, Any] = {"progress": False, "max_tps": None}


def _years(frame: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(frame["StudyDate"].str[:4], errors="coerce")


def test_where_not_on_derived_values_is_exact(service: LocalService) -> None:
    client = service.client()
    ds = service.datastore_id
    assert ds is not None
    everything = Query(ds).to_dataframe(client=client, **FAST)
    year = _years(everything)
    age = everything.ahi.age_at_study()
    # != keeps rows whose value is missing, as it does on a schema column
    expected = set(everything.loc[(year != 2021) | year.isna(), "imageSetId"])
    got = Query(ds).where_not(StudyYear=2021).to_dataframe(client=client, **FAST)
    assert set(got["imageSetId"]) == expected
    assert 0 < len(expected) < len(everything)
    not_ages = Query(ds).where_not(ageAtStudy=[40, 41]).to_dataframe(client=client, **FAST)
    keep = ~age.isin([40, 41]).fillna(False).astype(bool) | age.isna()
    assert set(not_ages["imageSetId"]) == set(everything.loc[keep, "imageSetId"])
    union = Query(ds).where_not(StudyYear=2021) | Query(ds).where(Modality="CT")
    got_union = union.to_dataframe(client=client, **FAST)
    ct = set(everything.loc[everything["Modality"] == "CT", "imageSetId"])
    assert set(got_union["imageSetId"]) == expected | ct
