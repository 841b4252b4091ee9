"""The QIDO-RS index: studies and series of a datastore's primary image sets, and their values.

Rebuilt when the datastore changes (its ``updatedAt`` moves on every add, update, copy and
delete). Summary tags give the study and series keys; series attributes beyond the summaries
(SeriesDescription, Manufacturer...) and the instances come from the generated metadata
document that GetImageSetMetadata serves, read here without counting as an access.

Study consistency (``aws-facts.md`` §1): AWS lets a study's primary image sets disagree on
study- and patient-level attributes (an UpdateImageSetMetadata without
``includeStudyImageSets`` changes one image set). QIDO-RS reports one value per study; here
(local choice, undocumented upstream):

- a **study-level** record (``/studies``) reports, and is matched on, the values of the study's
  most recently updated primary image set (ties by imageSetId); ModalitiesInStudy and the
  counts aggregate every series;
- a **series- or instance-level** record reports, and is matched on, its own image set's values
  for study and patient attributes too (``series_study_values="own"``, the default), or the
  study's values (``"study"``: the other behaviour AWS may have).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from healthimaging_df.local.backend import Backend
from healthimaging_df.local.documents import metadata_document
from healthimaging_df.local.qido_match import (
    ATTRIBUTES,
    SERIES_ALL,
    SERIES_KEYS,
    STUDY_ALL,
    STUDY_KEYS,
    Matcher,
    any_match,
    number_key,
)

__all__ = ["SERIES_STUDY_VALUES", "Index", "QidoIndex", "Series", "Study"]

SERIES_STUDY_VALUES = ("own", "study")
"""Where series- and instance-level records take study and patient attributes from."""

_INSTANCE_CACHE = 20_000
# Study aggregates: the same at every level.
_AGGREGATES = frozenset(
    {"ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"}
)
# Attributes only the metadata document knows (reading them costs a document per image set).
_FROM_METADATA = frozenset(
    {
        "SeriesDescription",
        "Manufacturer",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "NumberOfSeriesRelatedInstances",
        "NumberOfStudyRelatedInstances",
    }
)


@dataclass
class Series:
    """One series: the primary image set that shows it."""

    uid: str
    study_uid: str
    record: dict[str, Any]


@dataclass
class Study:
    """One study: its series and the record that speaks for it (the latest updated)."""

    uid: str
    record: dict[str, Any]
    updated: datetime
    series: list[Series] = field(default_factory=list)


@dataclass
class Index:
    """Studies and series of one datastore at one ``updatedAt`` stamp."""

    stamp: Any
    studies: dict[str, Study]
    series: dict[str, Series]


def build_index(records: Iterable[dict[str, Any]], stamp: Any) -> Index:
    """Group primary image sets by series, then by study."""
    series: dict[str, Series] = {}
    for record in records:
        if record.get("isPrimary", True) is not True:
            continue  # QIDO sees primary image sets only
        tags = record.get("DICOMTags") or {}
        study_uid, series_uid = (
            tags.get("DICOMStudyInstanceUID"),
            tags.get("DICOMSeriesInstanceUID"),
        )
        if not isinstance(study_uid, str) or not isinstance(series_uid, str):
            continue
        old = series.get(series_uid)
        # Local choice: two primary image sets of one series show the latest updated one.
        if old is None or (record["updatedAt"], record["imageSetId"]) > (
            old.record["updatedAt"],
            old.record["imageSetId"],
        ):
            series[series_uid] = Series(series_uid, study_uid, record)
    studies: dict[str, Study] = {}
    for entry in series.values():
        record = entry.record
        study = studies.get(entry.study_uid)
        if study is None:
            studies[entry.study_uid] = Study(entry.study_uid, record, record["updatedAt"], [entry])
            continue
        study.series.append(entry)
        if (record["updatedAt"], record["imageSetId"]) > (
            study.updated,
            study.record["imageSetId"],
        ):
            study.updated, study.record = record["updatedAt"], record
    return Index(stamp, studies, series)


def _tag(record: dict[str, Any], keyword: str) -> Any:
    summary_tag = ATTRIBUTES[keyword][2]
    return None if summary_tag is None else record["DICOMTags"].get(summary_tag)


class QidoIndex:
    """Indexes, values and matching over one :class:`Backend`; thread-safe.

    ``series_study_values`` is read on every request (see the module docstring).
    """

    def __init__(self, backend: Backend, series_study_values: str = "own") -> None:
        self.backend = backend
        self.series_study_values = series_study_values
        self._lock = threading.Lock()
        self._indexes: dict[str, Index] = {}
        # Series attributes and instance counts of every document read (small, kept); the
        # instances themselves only for the most recent _INSTANCE_CACHE image sets.
        self._series_cache: dict[tuple[str, int], tuple[dict[str, Any], int]] = {}
        self._instance_cache: OrderedDict[tuple[str, int], list[dict[str, Any]]] = OrderedDict()

    def index(self, datastore_id: str) -> Index:
        """The current index of a datastore (``ResourceNotFound`` if it does not exist)."""
        stamp = self.backend.get_datastore(datastore_id)["updatedAt"]
        with self._lock:
            index = self._indexes.get(datastore_id)
        if index is not None and index.stamp == stamp:
            return index
        index = build_index(self.backend.image_sets(datastore_id), stamp)
        with self._lock:
            self._indexes[datastore_id] = index
        return index

    # -- documents --------------------------------------------------------------------------

    def _read(self, datastore_id: str, record: dict[str, Any]) -> list[dict[str, Any]]:
        key = (record["imageSetId"], record["version"])
        document = metadata_document(datastore_id, record)
        (series,) = document["Study"]["Series"].values()
        instances = [i["DICOM"] for i in series["Instances"].values()]
        instances.sort(key=lambda d: (d.get("InstanceNumber", 1 << 62), d["SOPInstanceUID"]))
        with self._lock:
            self._series_cache[key] = (dict(series["DICOM"]), len(instances))
            self._instance_cache[key] = instances
            while len(self._instance_cache) > _INSTANCE_CACHE:
                self._instance_cache.popitem(last=False)
        return instances

    def _series_document(
        self, datastore_id: str, record: dict[str, Any]
    ) -> tuple[dict[str, Any], int]:
        """Series attributes and instance count of one image set's metadata (cached)."""
        key = (record["imageSetId"], record["version"])
        with self._lock:
            cached = self._series_cache.get(key)
        if cached is None:
            self._read(datastore_id, record)
            cached = self._series_cache[key]
        return cached

    def instances_of(self, datastore_id: str, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The instances (DICOM attributes) of one image set, InstanceNumber ascending."""
        key = (record["imageSetId"], record["version"])
        with self._lock:
            cached = self._instance_cache.get(key)
            if cached is not None:
                self._instance_cache.move_to_end(key)
                return cached
        return self._read(datastore_id, record)

    # -- attribute values -------------------------------------------------------------------

    def study_value(self, ds: str, study: Study, keyword: str) -> Any:
        """A study-level attribute as a ``/studies`` record reports it."""
        if keyword == "ModalitiesInStudy":
            found = {s.record["DICOMTags"].get("DICOMSeriesModality") for s in study.series}
            return sorted(m for m in found if isinstance(m, str)) or None
        if keyword == "NumberOfStudyRelatedSeries":
            return len(study.series)
        if keyword == "NumberOfStudyRelatedInstances":
            return sum(self._series_document(ds, s.record)[1] for s in study.series)
        return _tag(study.record, keyword)

    def series_value(self, ds: str, study: Study, series: Series, keyword: str) -> Any:
        """Any study- or series-level attribute as a series (or instance) record reports it."""
        if keyword in STUDY_ALL:
            if keyword in _AGGREGATES or self.series_study_values == "study":
                return self.study_value(ds, study, keyword)
            return _tag(series.record, keyword)
        if keyword == "NumberOfSeriesRelatedInstances":
            return self._series_document(ds, series.record)[1]
        if keyword in _FROM_METADATA:
            return self._series_document(ds, series.record)[0].get(keyword)
        return _tag(series.record, keyword)

    # -- matching ---------------------------------------------------------------------------

    def study_matches(self, ds: str, study: Study, match: dict[str, Matcher | None]) -> bool:
        """Whether a study record matches every study-level key of ``match``."""
        for keyword, test in match.items():
            if test is None or keyword not in STUDY_KEYS:
                continue
            if not any_match(test, self.study_value(ds, study, keyword)):
                return False
        return True

    def series_matches(
        self, ds: str, study: Study, series: Series, match: dict[str, Matcher | None]
    ) -> bool:
        """Whether a series record matches every study- and series-level key of ``match``."""
        for keyword, test in match.items():
            if test is None or keyword not in SERIES_KEYS:
                continue
            if not any_match(test, self.series_value(ds, study, series, keyword)):
                return False
        return True

    # -- searches ---------------------------------------------------------------------------

    def studies(self, ds: str, match: dict[str, Matcher | None]) -> list[Study]:
        """Matching studies, last update first (documented; local choice: ties by UID)."""
        index = self.index(ds)
        rows = [s for s in index.studies.values() if self.study_matches(ds, s, match)]
        rows.sort(key=lambda s: s.uid)
        rows.sort(key=lambda s: s.updated, reverse=True)
        return rows

    def scope(self, index: Index, study_uid: str | None) -> list[Study]:
        """Every study, or the one in the path (local choice: an unknown study is no match)."""
        if study_uid is None:
            return list(index.studies.values())
        study = index.studies.get(study_uid)
        return [] if study is None else [study]

    def series(
        self, ds: str, study_uid: str | None, match: dict[str, Matcher | None]
    ) -> list[tuple[Study, Series]]:
        """Matching series, SeriesNumber ascending (documented; local choice: missing last)."""
        index = self.index(ds)
        rows = [
            (study, series)
            for study in self.scope(index, study_uid)
            for series in study.series
            if self.series_matches(ds, study, series, match)
        ]
        rows.sort(
            key=lambda pair: number_key(
                pair[1].record["DICOMTags"].get("DICOMSeriesNumber"), pair[1].uid
            )
        )
        return rows

    def instances(
        self,
        ds: str,
        study_uid: str | None,
        series_uid: str | None,
        match: dict[str, Matcher | None],
    ) -> list[tuple[Study, Series, dict[str, Any]]]:
        """Matching instances, InstanceNumber ascending (documented; then SOPInstanceUID)."""
        index = self.index(ds)
        own = {k: m for k, m in match.items() if k in ("SOPClassUID", "SOPInstanceUID")}
        rows: list[tuple[Study, Series, dict[str, Any]]] = []
        for study in self.scope(index, study_uid):
            for series in study.series:
                if series_uid is not None and series.uid != series_uid:
                    continue
                if not self.series_matches(ds, study, series, match):
                    continue
                for instance in self.instances_of(ds, series.record):
                    if all(m is None or m(instance.get(k)) for k, m in own.items()):
                        rows.append((study, series, instance))
        rows.sort(
            key=lambda row: number_key(row[2].get("InstanceNumber"), row[2]["SOPInstanceUID"])
        )
        return rows

    def values(
        self,
        ds: str,
        study: Study,
        series: Series | None,
        instance: dict[str, Any] | None,
        keywords: list[str],
    ) -> dict[str, Any]:
        """The values of ``keywords`` for one record of the level the arguments name."""
        values: dict[str, Any] = {}
        for keyword in keywords:
            if series is None:
                values[keyword] = self.study_value(ds, study, keyword)
            elif keyword in STUDY_ALL or keyword in SERIES_ALL:
                values[keyword] = self.series_value(ds, study, series, keyword)
            elif instance is not None:
                values[keyword] = instance.get(keyword)
        return values
