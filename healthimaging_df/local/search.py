"""SearchImageSets semantics: criteria parsing and validation, and keyset paging over the indexes.

Search is indexed, not scanned: a dict per EQUAL attribute and one sorted list of
``(key, imageSetId)`` per sort field (:mod:`~healthimaging_df.local.state`), so a page costs a
bisect plus a short walk even at 100,000 image sets. A cursor is the last :data:`Entry`
returned; the next page starts strictly after it, so updates between pages never shift rows
that did not change.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from healthimaging_df.local.errors import ValidationError
from healthimaging_df.local.state import Datastore, Entry
from healthimaging_df.local.values import (
    ALL_ATTRIBUTES,
    BETWEEN_ATTRIBUTES,
    EQUAL_ATTRIBUTES,
    MAX_RESULTS,
    MAX_STRING,
    REQ_DATE_RE,
    REQ_TIME_RE,
    SORT_FIELDS,
    SORT_ORDERS,
    UID_ATTRIBUTES,
    UID_RE,
    parse_timestamp,
    to_us,
    wall_clock_key,
)

__all__ = ["Query", "after", "check_max_results", "page", "parse_criteria"]

# Materialize-and-sort a candidate set this small rather than walk a sort index.
_MATERIALIZE_LIMIT = 5000


@dataclass(frozen=True)
class Query:
    """A validated search: EQUAL constraints, inclusive key ranges, and the effective sort."""

    equal: dict[str, Any]
    ranges: dict[str, tuple[int, int]]
    sort_field: str
    descending: bool
    sort_given: dict[str, str] | None
    canonical: str


def _require_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(f"{where} must be an object")
    return value


def _check_members(value: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = set(value) - set(allowed)
    if unknown:
        raise ValidationError(f"{where} has {len(unknown)} unknown member(s)")


def _parse_equal_value(attribute: str, value: Any, where: str) -> Any:
    if attribute == "isPrimary":
        if not isinstance(value, bool):
            raise ValidationError(f"{where}: isPrimary must be a boolean")
        return value
    if not isinstance(value, str):
        raise ValidationError(f"{where}: {attribute} must be a string")
    if value == "":
        raise ValidationError(f"{where}: {attribute} must not be empty")
    if len(value) > MAX_STRING:
        raise ValidationError(f"{where}: {attribute} must be at most {MAX_STRING} characters")
    if attribute in UID_ATTRIBUTES and UID_RE.fullmatch(value) is None:
        raise ValidationError(
            f"{where}: {attribute} must match [0-9.]+ (digits and dots, no leading, trailing "
            "or doubled dot)"
        )
    return value


def _parse_study_value(value: Any, where: str) -> int:
    item = _require_dict(value, f"{where}.DICOMStudyDateAndTime")
    _check_members(item, ("DICOMStudyDate", "DICOMStudyTime"), f"{where}.DICOMStudyDateAndTime")
    date_text = item.get("DICOMStudyDate")
    if not isinstance(date_text, str):
        raise ValidationError(f"{where}: DICOMStudyDateAndTime.DICOMStudyDate is required")
    date_match = REQ_DATE_RE.fullmatch(date_text)
    if date_match is None:
        raise ValidationError(f"{where}: DICOMStudyDate must be 8 digits YYYYMMDD")
    time_text = item.get("DICOMStudyTime")
    hour = minute = second = micro = 0
    if time_text is not None:
        time_match = REQ_TIME_RE.fullmatch(time_text) if isinstance(time_text, str) else None
        if time_match is None:
            raise ValidationError(f"{where}: DICOMStudyTime must be HHMMSS or HHMMSS.ffffff")
        hour, minute, second = (int(time_match.group(i)) for i in (1, 2, 3))
        micro = int((time_match.group(4) or "0").ljust(6, "0"))
    try:
        year, month, day = (int(date_match.group(i)) for i in (1, 2, 3))
        moment = datetime(year, month, day)
    except ValueError:
        raise ValidationError(f"{where}: DICOMStudyDate is not a calendar date") from None
    try:
        moment = moment.replace(hour=hour, minute=minute, second=second, microsecond=micro)
    except ValueError:
        raise ValidationError(f"{where}: DICOMStudyTime is not a valid time of day") from None
    return wall_clock_key(moment)


def _parse_between_value(attribute: str, value: Any, where: str) -> int:
    if attribute == "DICOMStudyDateAndTime":
        return _parse_study_value(value, where)
    return to_us(parse_timestamp(value, f"{where}.{attribute}"))


def _check_operator(
    where: str, operator: str, attribute: str, allowed: tuple[str, ...], given: int, takes: int
) -> None:
    """Raise unless *operator* applies to *attribute* and was given the *takes* values it needs."""
    if attribute not in allowed:
        raise ValidationError(f"{where}: {operator} applies to {', '.join(allowed)} only")
    if given != takes:
        raise ValidationError(f"{where}: {operator} takes exactly {_NUMBERS[takes]}")


_NUMBERS = {1: "one value", 2: "two values"}


def parse_criteria(criteria: Any, datastore_id: str, one_range: bool = False) -> Query:
    """Validate ``searchCriteria`` (already JSON-decoded) into a :class:`Query`.

    *one_range*: refuse two BETWEEN filters in one request (a stricter service).

    Raises
    ------
    ValidationError
        On any rule of the service model or the documented search semantics.
    """
    if criteria is None:
        criteria = {}
    criteria = _require_dict(criteria, "searchCriteria")
    _check_members(criteria, ("filters", "sort"), "searchCriteria")
    equal: dict[str, Any] = {}
    ranges: dict[str, tuple[int, int]] = {}
    canonical_filters: list[list[Any]] = []
    if "filters" in criteria:
        filters = criteria["filters"]
        if not isinstance(filters, list) or not 1 <= len(filters) <= 2:
            raise ValidationError(
                "searchCriteria.filters must be a list of 1 to 2 filters "
                "(omit searchCriteria to list every image set)"
            )
        for f_index, raw_filter in enumerate(filters):
            where = f"filters[{f_index}]"
            flt = _require_dict(raw_filter, where)
            _check_members(flt, ("values", "operator"), where)
            operator = flt.get("operator")
            if operator not in ("EQUAL", "BETWEEN"):
                raise ValidationError(f"{where}.operator must be EQUAL or BETWEEN")
            values = flt.get("values")
            if not isinstance(values, list) or not 1 <= len(values) <= 2:
                raise ValidationError(f"{where}.values must be a list of 1 to 2 values")
            attributes: list[str] = []
            for v_index, raw_value in enumerate(values):
                vwhere = f"{where}.values[{v_index}]"
                item = _require_dict(raw_value, vwhere)
                if len(item) != 1:
                    raise ValidationError(f"{vwhere} must set exactly one attribute")
                (attribute,) = item
                if attribute not in ALL_ATTRIBUTES:
                    raise ValidationError(f"{vwhere} names an unknown attribute")
                attributes.append(attribute)
            attribute = attributes[0]
            if any(a != attribute for a in attributes):
                raise ValidationError(
                    f"{where}: every value of a filter must use the same attribute"
                )
            if attribute in equal or attribute in ranges:
                raise ValidationError(f"{where}: {attribute} is already filtered by another filter")
            if operator == "EQUAL":
                _check_operator(where, "EQUAL", attribute, EQUAL_ATTRIBUTES, len(values), 1)
                value = _parse_equal_value(attribute, values[0][attribute], f"{where}.values[0]")
                equal[attribute] = value
                canonical_filters.append([attribute, "EQUAL", value])
            else:
                _check_operator(where, "BETWEEN", attribute, BETWEEN_ATTRIBUTES, len(values), 2)
                low = _parse_between_value(attribute, values[0][attribute], f"{where}.values[0]")
                high = _parse_between_value(attribute, values[1][attribute], f"{where}.values[1]")
                if low > high:
                    raise ValidationError(f"{where}: the lower bound is after the upper bound")
                if one_range and ranges:
                    raise ValidationError(f"{where}: only one BETWEEN filter is supported")
                ranges[attribute] = (low, high)
                canonical_filters.append([attribute, "BETWEEN", low, high])
    sort_given: dict[str, str] | None = None
    sort_field, descending = "updatedAt", True
    if "sort" in criteria:
        sort = _require_dict(criteria["sort"], "searchCriteria.sort")
        _check_members(sort, ("sortField", "sortOrder"), "searchCriteria.sort")
        if sort.get("sortField") not in SORT_FIELDS:
            raise ValidationError(f"sort.sortField must be one of {', '.join(SORT_FIELDS)}")
        if sort.get("sortOrder") not in SORT_ORDERS:
            raise ValidationError("sort.sortOrder must be ASC or DESC")
        sort_field, descending = sort["sortField"], sort["sortOrder"] == "DESC"
        sort_given = {"sortField": sort_field, "sortOrder": sort["sortOrder"]}
    canonical = json.dumps(
        [datastore_id, canonical_filters, sort_field, descending],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return Query(equal, ranges, sort_field, descending, sort_given, canonical)


def check_max_results(max_results: Any) -> None:
    """Raise :class:`ValidationError` unless ``max_results`` is an int in 1..50."""
    if (
        not isinstance(max_results, int)
        or isinstance(max_results, bool)
        or not 1 <= max_results <= MAX_RESULTS
    ):
        raise ValidationError(f"maxResults must be an integer from 1 to {MAX_RESULTS}")


# ---------------------------------------------------------------------------------------------
# Paging


def _matcher(store: Datastore, query: Query) -> Callable[[str], bool]:
    tag_equal = [(a, v) for a, v in query.equal.items() if a != "isPrimary"]
    primary = query.equal.get("isPrimary")
    ranges = list(query.ranges.items())
    current, keys = store.current, store.keys

    def matches(image_set_id: str) -> bool:
        record = current[image_set_id]
        if primary is not None and bool(record.get("isPrimary", True)) is not primary:
            return False
        tags = record["DICOMTags"]
        for attribute, value in tag_equal:
            if tags.get(attribute) != value:
                return False
        record_keys = keys[image_set_id]
        for name, (low, high) in ranges:
            key = record_keys[name]
            if key is None or not low <= key <= high:
                return False
        return True

    return matches


def page(
    store: Datastore,
    query: Query,
    cursor: Entry | None,
    limit: int,
    undated_first: bool = False,
) -> list[Entry]:
    """The next ``limit`` matching entries after ``cursor`` in the query's order.

    Entries without a key of the sort field form a group of their own, after the keyed ones
    (group 1) or, with *undated_first*, before them (group -1), by imageSetId in both orders.
    """
    matches = _matcher(store, query)
    sort_name = query.sort_field
    candidates: set[str] | None = None
    id_sets = [
        store.equal_index[a].get(v, set()) for a, v in query.equal.items() if a != "isPrimary"
    ]
    if id_sets:
        candidates = min(id_sets, key=len)
    else:
        best: tuple[int, str] | None = None
        for name, bounds in query.ranges.items():
            if name == sort_name:
                continue
            low, high = store.index(name).span(bounds)
            if best is None or high - low < best[0]:
                best = (high - low, name)
        if "isPrimary" in query.equal:
            size = len(store.equal_index["isPrimary"].get(query.equal["isPrimary"], ()))
            if best is None or size < best[0]:
                best = (size, "isPrimary")
        sort_low, sort_high = store.index(sort_name).span(query.ranges.get(sort_name))
        walk = sort_high - sort_low + len(store.sort_index[sort_name].unkeyed)
        # Walking the sort index costs about limit * walk / matches steps per page;
        # materializing costs the candidate count (and a sort) on every page.
        if best is not None and best[0] <= _MATERIALIZE_LIMIT and best[0] ** 2 <= limit * walk:
            if best[1] == "isPrimary":
                candidates = store.equal_index["isPrimary"].get(query.equal["isPrimary"], set())
            else:
                index = store.index(best[1])
                low, high = index.span(query.ranges[best[1]])
                candidates = {image_set_id for _, image_set_id in index.keyed[low:high]}
    if candidates is not None:
        return _materialized(store, query, candidates, matches, cursor, limit, undated_first)
    if undated_first and query.sort_field not in query.ranges:
        head = _walk_unkeyed(store, query, matches, cursor, limit, -1)
        if len(head) >= limit:
            return head
        rest = cursor if cursor is not None and cursor[0] >= 0 else None
        return head + _walk(store, query, matches, rest, limit - len(head), keyed_only=True)
    return _walk(store, query, matches, cursor, limit)


def _materialized(
    store: Datastore,
    query: Query,
    candidates: set[str],
    matches: Callable[[str], bool],
    cursor: Entry | None,
    limit: int,
    undated_first: bool = False,
) -> list[Entry]:
    keyed: list[tuple[int, str]] = []
    unkeyed: list[str] = []
    for image_set_id in candidates:
        if not matches(image_set_id):
            continue
        key = store.keys[image_set_id][query.sort_field]
        if key is None:
            unkeyed.append(image_set_id)
        else:
            keyed.append((key, image_set_id))
    keyed.sort(reverse=query.descending)
    unkeyed.sort()
    ordered: list[Entry] = [(0, k, i) for k, i in keyed]
    if undated_first:
        ordered = [(-1, 0, i) for i in unkeyed] + ordered
    else:
        ordered += [(1, 0, i) for i in unkeyed]
    if cursor is not None:
        ordered = [entry for entry in ordered if after(entry, cursor, query.descending)]
    return ordered[:limit]


def _walk(
    store: Datastore,
    query: Query,
    matches: Callable[[str], bool],
    cursor: Entry | None,
    limit: int,
    keyed_only: bool = False,
) -> list[Entry]:
    index = store.index(query.sort_field)
    low, high = index.span(query.ranges.get(query.sort_field))
    keyed = index.keyed
    out: list[Entry] = []
    if cursor is None or cursor[0] == 0:
        if query.descending:
            start = high if cursor is None else min(high, bisect.bisect_left(keyed, cursor[1:]))
            positions: Iterable[int] = range(start - 1, low - 1, -1)
        else:
            start = low if cursor is None else max(low, bisect.bisect_right(keyed, cursor[1:]))
            positions = range(start, high)
        for position in positions:
            key, image_set_id = keyed[position]
            if matches(image_set_id):
                out.append((0, key, image_set_id))
                if len(out) >= limit:
                    return out
    if query.sort_field in query.ranges or keyed_only:
        return out  # a range on the sort field excludes records without a key
    # Records without a key (undated studies) come last in both orders, by id.
    return out + _walk_unkeyed(store, query, matches, cursor, limit - len(out), 1)


def _walk_unkeyed(
    store: Datastore,
    query: Query,
    matches: Callable[[str], bool],
    cursor: Entry | None,
    limit: int,
    group: int,
) -> list[Entry]:
    """Matching entries without a sort key (in *group*, -1 first or 1 last) after ``cursor``."""
    out: list[Entry] = []
    if limit <= 0 or (cursor is not None and cursor[0] > group):
        return out
    unkeyed = store.index(query.sort_field).unkeyed
    first = 0 if cursor is None or cursor[0] < group else bisect.bisect_right(unkeyed, cursor[2])
    for image_set_id in unkeyed[first:]:
        if matches(image_set_id):
            out.append((group, 0, image_set_id))
            if len(out) >= limit:
                break
    return out


def after(entry: Entry, cursor: Entry, descending: bool) -> bool:
    """Whether ``entry`` comes strictly after ``cursor`` in the result order."""
    if entry[0] != cursor[0]:
        return entry[0] > cursor[0]
    if entry[0] != 0 or not descending:
        return entry[1:] > cursor[1:]
    return entry[1:] < cursor[1:]
