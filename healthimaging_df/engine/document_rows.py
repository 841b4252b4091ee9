"""GetImageSetMetadata documents to rows: one per series, or per instance, built column-wise.

:func:`flatten_document` is the definition (a row at a time, public); :func:`document_block` builds
the same rows as columns (a :class:`Block`), fast enough for series of hundreds of instances, and
:func:`blocks_to_frame` joins blocks into the enrichment's frame.
"""

from __future__ import annotations

import itertools
import json
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import pyarrow as pa

from healthimaging_df import schema
from healthimaging_df.aws.documents import parse_document

__all__ = [
    "Block",
    "Level",
    "blob_block",
    "blocks_to_frame",
    "document_block",
    "flatten_document",
]

Level = Literal["series", "instance"]


def _scalar_attributes(instances: list[dict[str, Any]]) -> dict[str, Any]:
    """Attributes every instance has, with the same value in each."""
    if not instances:
        return {}
    common = dict(instances[0])
    for dicom in instances[1:]:
        for keyword in list(common):
            if keyword not in dicom or dicom[keyword] != common[keyword]:
                del common[keyword]
    return common


def flatten_document(document: dict[str, Any], level: Level = "series") -> Iterator[dict[str, Any]]:
    """Rows of one GetImageSetMetadata document: one per series, or per instance.

    A series row holds the series' ``DICOM`` attributes, every instance attribute that all its
    instances share (SOPClassUID, SliceThickness, Rows...), and
    ``NumberOfSeriesRelatedInstances``. An instance row holds the series attributes and the
    instance's own, plus ``SeriesInstanceUID`` and ``SOPInstanceUID`` from the document's keys.

    >>> doc = {"Study": {"Series": {"1.2": {"DICOM": {"Modality": "CT"}, "Instances": {
    ...     "1.2.1": {"DICOM": {"Rows": 512, "InstanceNumber": 1}},
    ...     "1.2.2": {"DICOM": {"Rows": 512, "InstanceNumber": 2}}}}}}}
    >>> list(flatten_document(doc))
    [{'SeriesInstanceUID': '1.2', 'Modality': 'CT', 'Rows': 512, 'NumberOfSeriesRelatedInstances': 2}]
    >>> [row["InstanceNumber"] for row in flatten_document(doc, "instance")]
    [1, 2]
    """
    series_map = (document.get("Study") or {}).get("Series") or {}
    for series_uid, series in series_map.items():
        series_dicom = dict(series.get("DICOM") or {})
        instances = series.get("Instances") or {}
        if level == "instance":
            for sop_uid, instance in instances.items():
                row: dict[str, Any] = {"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}
                for keyword, value in series_dicom.items():
                    row.setdefault(keyword, value)
                for keyword, value in (instance.get("DICOM") or {}).items():
                    row.setdefault(keyword, value)
                yield row
            continue
        shared = _scalar_attributes([i.get("DICOM") or {} for i in instances.values()])
        yield _series_row(series_uid, series_dicom, shared, len(instances))


def _series_row(
    series_uid: str, series_dicom: dict[str, Any], shared: dict[str, Any], count: int
) -> dict[str, Any]:
    """One series' row, as ``flatten_document`` and ``document_block`` both build it.

    The series' attributes, then those its *count* instances all share (*shared*) but their UID
    and number, then ``NumberOfSeriesRelatedInstances``.
    """
    row: dict[str, Any] = {"SeriesInstanceUID": series_uid}
    for keyword, value in series_dicom.items():
        row.setdefault(keyword, value)
    shared.pop("SOPInstanceUID", None)
    shared.pop("InstanceNumber", None)
    for keyword, value in shared.items():
        row.setdefault(keyword, value)
    row["NumberOfSeriesRelatedInstances"] = count
    return row


@dataclass
class Block:
    """One document's rows, column by column: ``columns[keyword]`` holds ``rows`` values."""

    rows: int
    columns: dict[str, list[Any]]


def _shared(instances: list[dict[str, Any]]) -> dict[str, Any]:
    """``_scalar_attributes`` column-wise, in C.

    The second instance rules out the keywords that vary (position, number, UID...); one
    ``itemgetter`` call per instance and one ``list.count`` of the first instance's tuple then
    check the rest at once, column by column only if some instance disagrees. No Python loop
    over every (instance, keyword) pair.
    """
    if not instances or not instances[0]:
        return {}
    first = instances[0]
    missing = object()
    if len(instances) > 1:
        second = instances[1]
        keys = [k for k, v in first.items() if second.get(k, missing) == v]
    else:
        keys = list(first)
    if not keys:
        return {}
    try:
        rows = list(map(operator.itemgetter(*keys), instances))
    except KeyError:  # some instance lacks a keyword: compare keyword by keyword
        return {k: first[k] for k in keys if all(d.get(k, missing) == first[k] for d in instances)}
    if rows.count(rows[0]) == len(rows):  # every candidate shared by every instance
        return {k: first[k] for k in keys}
    columns = [rows] if len(keys) == 1 else list(zip(*rows, strict=True))
    return {
        k: first[k]
        for k, column in zip(keys, columns, strict=True)
        if column.count(column[0]) == len(column)
    }


def document_block(document: dict[str, Any], level: Level) -> Block:
    """What ``flatten_document`` yields, built as columns (same values, same column order)."""
    series_map = (document.get("Study") or {}).get("Series") or {}
    parts: list[Block] = []
    for series_uid, series in series_map.items():
        series_dicom = series.get("DICOM") or {}
        instances = series.get("Instances") or {}
        if level == "instance":
            sop_uids = list(instances)
            dicoms = [i.get("DICOM") or {} for i in instances.values()]
            n = len(dicoms)
            columns: dict[str, list[Any]] = {
                "SeriesInstanceUID": [series_uid] * n,
                "SOPInstanceUID": sop_uids,
            }
            for keyword, value in series_dicom.items():
                columns.setdefault(keyword, [value] * n)
            for keyword in dict.fromkeys(itertools.chain.from_iterable(dicoms)):
                if keyword not in columns:
                    columns[keyword] = [d.get(keyword) for d in dicoms]
            if n:  # a series without instances has no instance rows
                parts.append(Block(n, columns))
            continue
        shared = _shared([i.get("DICOM") or {} for i in instances.values()])
        row = _series_row(series_uid, series_dicom, shared, len(instances))
        parts.append(Block(1, {k: [v] for k, v in row.items()}))
    if len(parts) == 1:
        return parts[0]
    return _concat(parts) if parts else Block(0, {})


def _concat(blocks: list[Block]) -> Block:
    """Blocks one after another; a column a block lacks is None there."""
    names = dict.fromkeys(itertools.chain.from_iterable(b.columns for b in blocks))
    columns: dict[str, list[Any]] = {}
    for name in names:
        values: list[Any] = []
        for block in blocks:
            values.extend(block.columns.get(name) or [None] * block.rows)
        columns[name] = values
    return Block(sum(b.rows for b in blocks), columns)


def blocks_to_frame(blocks: list[Block], keys: list[str]) -> pd.DataFrame:
    """The frame of blocks in order: ``keys`` first, then columns in order of first appearance."""
    blocks = [b for b in blocks if b.rows]
    names = list(dict.fromkeys(itertools.chain(keys, *(b.columns for b in blocks))))
    arrays = []
    for name in names:
        values: list[Any] = []
        for block in blocks:
            column = block.columns.get(name)
            values.extend(column if column is not None else [None] * block.rows)
        arrays.append(_column(values))
    table = pa.Table.from_arrays(arrays, names=names)
    frame: pd.DataFrame = table.to_pandas(types_mapper=schema.pandas_type)
    if "version" in frame.columns:
        frame["version"] = frame["version"].astype("Int64")
    return frame


def _column(values: list[Any]) -> pa.Array:
    """An Arrow array of one attribute; values of mixed or unusual types become JSON text."""
    try:
        array = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        array = None
    if array is None:
        text = [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
        return pa.array(text, type=pa.string())
    if pa.types.is_null(array.type):  # every value missing
        return array.cast(pa.string())
    return array


def blob_block(blob: bytes, level: Level) -> Block:
    """Parse and flatten one document; the document is freed on return, the block kept.

    Called inside ``collector_paused``: the parsed tree (thousands of dicts and lists for a
    series of hundreds of instances) dies by reference counting before the cyclic collector
    could walk it.
    """
    return document_block(parse_document(blob), level)
