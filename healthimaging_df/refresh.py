"""Incremental refresh: upsert the image sets updated since the last fetch, drop those that left.

The delta comes from the engine (``engine.changes``: the same checked pipeline as any query); this
module merges it into a frame or a snapshot read through ``healthimaging_df.snapshot``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypedDict

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import engine, schema
from healthimaging_df.aws.quotas import SEARCH_TPS
from healthimaging_df.core import checks, dates
from healthimaging_df.engine import frame, provenance
from healthimaging_df.engine.provenance import KEY as METADATA_KEY
from healthimaging_df.errors import HealthImagingDFError, QueryValidationError, SnapshotError
from healthimaging_df.options import WriteLocation, keywords, subset
from healthimaging_df.query import Query
from healthimaging_df.snapshot import check_redact, commit_rows, locate, read_table
from healthimaging_df.store.redact import RedactionPolicy, apply_redaction
from healthimaging_df.store.table_format import retry_on_conflict
from healthimaging_df.store.tables import (
    dtype_backend_of,
    frame_to_table,
    iso,
    parse_iso,
    table_to_frame,
    table_watermark,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from healthimaging_df.core.progress import Progress

DEFAULT_MARGIN = dates.CLOCK_MARGIN


# keyword groups (see options.keywords); here, not in options.py, since they name Query
class ChangeOptions(TypedDict, total=False):
    """How a refresh or a sync reads changes: client and pace, the query, redaction and margin."""

    client: Any
    boto3_session: Any
    query: Query | None
    redact: RedactionPolicy | None
    margin: timedelta
    max_concurrency: int | None
    max_tps: float | None


class RefreshOptions(ChangeOptions, total=False):
    """``refresh_frame`` (``refresh._refresh_table``): :class:`ChangeOptions`, progress, reconcile."""

    progress: Progress
    reconcile: bool


class RefreshSnapshotOptions(RefreshOptions, WriteLocation, total=False):
    """``refresh_snapshot``: a refresh's options and where the snapshot is."""


class SyncOptions(ChangeOptions, WriteLocation, total=False):
    """``sync_snapshot``'s keywords shared with ``refresh_snapshot``: changes, and where."""


@dataclass(frozen=True)
class RefreshReport:
    """What a refresh changed.

    Attributes
    ----------
    added
        imageSetIds now in the result that were not before.
    updated
        imageSetIds still in the result whose version or updatedAt changed.
    removed
        imageSetIds that left the result (they no longer match the query, or, found by a
        reconciling refresh, no longer exist).
    fetched
        Image sets the service returned for the updatedAt range.
    since
        Lower bound of the updatedAt range that was fetched.
    rows
        Rows in the refreshed result.
    watermark
        Highest updatedAt in the refreshed result.
    retiered
        imageSetIds at the same version whose storageTier or lastAccessedAt changed (found by a
        reconciling refresh only: neither moves updatedAt).
    reconciled
        Whether this was a reconciling refresh (a full read of the query's matches).
    """

    added: tuple[str, ...]
    updated: tuple[str, ...]
    removed: tuple[str, ...]
    fetched: int
    since: datetime
    rows: int
    watermark: datetime | None
    retiered: tuple[str, ...] = ()
    reconciled: bool = False

    @property
    def changed(self) -> bool:
        """Whether anything was added, updated, removed or re-tiered."""
        return bool(self.added or self.updated or self.removed or self.retiered)

    def __str__(self) -> str:
        if self.reconciled:
            return (
                f"{len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} "
                f"removed, {len(self.retiered)} re-tiered (reconciled: {self.fetched} image sets "
                f"match; {self.rows} rows)"
            )
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed "
            f"({self.fetched} image sets updated since {self.since.isoformat()}; {self.rows} rows)"
        )

    def __repr__(self) -> str:
        return (
            f"RefreshReport(added={len(self.added)}, updated={len(self.updated)}, "
            f"removed={len(self.removed)}, fetched={self.fetched}, rows={self.rows}, "
            f"since={self.since.isoformat()}, watermark="
            f"{self.watermark.isoformat() if self.watermark else None}, "
            f"retiered={len(self.retiered)}, reconciled={self.reconciled})"
        )

    def _rows(self) -> list[tuple[str, str]]:
        return [
            ("added", f"{len(self.added):,} image set(s)"),
            ("updated", f"{len(self.updated):,} image set(s)"),
            ("removed", f"{len(self.removed):,} image set(s) (no longer match or exist)"),
            ("re-tiered", f"{len(self.retiered):,} image set(s) (storageTier, lastAccessedAt)"),
            ("fetched", f"{self.fetched:,} image set(s) updated since {self.since.isoformat()}"),
            ("rows", f"{self.rows:,} in the refreshed result"),
            ("watermark", self.watermark.isoformat() if self.watermark else "(none)"),
        ]

    def _repr_html_(self) -> str:
        """Counts and moments only (the ids are in ``added``, ``updated``, ``removed``)."""
        from healthimaging_df.core import display

        return display.section("RefreshReport", self._rows())


@dataclass(frozen=True)
class _Change:
    """A refresh's outcome: the merged table, and the rows and ids a MERGE needs."""

    result: pa.Table
    incoming: pa.Table
    provenance: dict[str, Any]
    report: RefreshReport


def _refresh_table(
    table: pa.Table,
    prov: dict[str, Any],
    *,
    client: Any = None,
    boto3_session: Any = None,
    query: Query | None = None,
    redact: RedactionPolicy | None = None,
    margin: timedelta = DEFAULT_MARGIN,
    progress: Progress = None,
    max_concurrency: int | None = None,
    max_tps: float | None = SEARCH_TPS,
    reconcile: bool = False,
) -> _Change:
    """A refresh of *table* (provenance *prov*); the options of :func:`refresh_frame`."""
    checks.flag("reconcile", reconcile)
    query = checked_query(table, prov, query, redact, margin)
    run = engine.prepare(client, boto3_session, progress, max_concurrency, max_tps)
    if reconcile:
        return reconciled(table, prov, query, redact, run)
    since = _refresh_since(prov, table, margin)
    started = datetime.now(timezone.utc)
    fetched = engine.changes(query.datastore_id, since, started + timedelta(days=2), run)
    return apply_fetched(table, prov, query, redact, fetched, run.client, started, since)


@keywords(RefreshOptions, _refresh_table)
def refresh_frame(
    df: pd.DataFrame, **options: Unpack[RefreshOptions]
) -> tuple[pd.DataFrame, RefreshReport]:
    """Bring a frame from this library up to date without re-reading the whole datastore.

    Fetches every image set of the datastore updated since the last fetch started (minus
    *margin*), upserts them by imageSetId keeping the highest version, and drops rows that no
    longer match the query (an ``isPrimary`` flip or a tag change can move an image set out of the
    cohort). The result equals a fresh run of the same query, except for ``lastAccessedAt`` and
    ``storageTier``, which change without a new ``updatedAt``; image sets deleted from the
    datastore are not detected either (``reconcile=True`` catches both).

    Parameters
    ----------
    df
        A frame with provenance in ``attrs["healthimaging_df"]`` (from ``to_dataframe``, a
        snapshot or an earlier refresh).
    client, boto3_session, progress, max_concurrency, max_tps
        As in ``Query.to_dataframe``.
    query
        The original query; read from the provenance when None (required for a redacted frame,
        whose provenance no longer holds the query's values).
    redact
        The policy the frame was redacted with (same key); required for a redacted frame.
    margin
        Safety margin below the last fetch's start, for clock skew between client and service.
    reconcile
        Read every matching image set instead of the updated ones (the query's own requests,
        no metadata access): rows of deleted image sets leave, and ``storageTier`` /
        ``lastAccessedAt`` become current. The backstop of incremental refreshes and of
        :func:`~healthimaging_df.sync.sync_snapshot`; it costs a fresh export's requests.

    Returns
    -------
    tuple of (pandas.DataFrame, RefreshReport)
    """
    if not isinstance(df, pd.DataFrame):
        raise QueryValidationError("df", "must be a pandas DataFrame")
    prov = dict(df.attrs.get(METADATA_KEY) or {})
    table = frame_to_table(df)
    change = _refresh_table(table, prov, **options)
    out = table_to_frame(change.result, dtype_backend_of(df), list(df.columns))
    out.attrs[METADATA_KEY] = change.provenance
    return out, change.report


@keywords(RefreshSnapshotOptions, _refresh_table, locate)
def refresh_snapshot(
    path: str | os.PathLike[str] | None = None,
    *,
    attempts: int = 5,
    **options: Unpack[RefreshSnapshotOptions],
) -> RefreshReport:
    """Refresh the snapshot at *path* (or the Iceberg table *iceberg_table*) in place, atomically.

    See :func:`refresh_frame`. The partitioning and redaction of the snapshot are kept. A table
    (Delta or Iceberg) gets one commit based on the version read, which upserts the newer rows
    by imageSetId, inserts new ones and deletes leavers, rewriting only the files that hold
    touched rows (in ``createdAt`` order, at the target file size); a refresh that finds nothing
    to change commits nothing. If another writer committed first (``SnapshotConflictError``),
    the refresh reads the new version and runs again, up to *attempts* times in all. A
    single-file snapshot is rewritten whole. Returns what changed.
    """
    where = locate(path, **subset(options, WriteLocation))
    refresh = subset(options, RefreshOptions)

    def once() -> RefreshReport:
        table, meta = read_table(where, None, None)
        change = _refresh_table(table, dict(meta["provenance"]), **refresh)
        if where.table is None or change.report.changed or change.incoming.num_rows:
            removed = list(change.report.removed)
            commit_rows(where, meta, change.result, change.incoming, removed, change.provenance)
        return change.report

    return retry_on_conflict(once, attempts=attempts)


def checked_query(
    table: pa.Table,
    prov: dict[str, Any],
    query: Query | None,
    redact: RedactionPolicy | None,
    margin: timedelta,
) -> Query:
    """The query a refresh (or sync) of *table* runs, after every check of its arguments."""
    check_redact(redact)
    if query is not None and not isinstance(query, Query):
        raise QueryValidationError("query", "must be a Query or None")
    if not isinstance(margin, timedelta) or margin < timedelta(0):
        raise QueryValidationError("margin", "must be a timedelta of zero or more")
    redaction = prov.get("redaction")
    if redaction:
        if query is None or redact is None:
            raise SnapshotError(
                "a redacted snapshot holds no query values: pass the original query= and the "
                "redact= policy (same key) to refresh it"
            )
        try:
            recorded = json.loads(redaction) if isinstance(redaction, str) else redaction
        except ValueError:
            raise SnapshotError("the provenance 'redaction' is damaged") from None
        if not isinstance(recorded, dict):
            raise SnapshotError("the provenance 'redaction' is damaged")
        fingerprints = prov.get("redaction_fingerprints")
        if not isinstance(fingerprints, dict):
            raise SnapshotError(
                "the snapshot keeps no redaction fingerprints (an older version wrote it): "
                "export it again"
            )
        # a salted, slow check of the key and a keyed fingerprint of the query: same key, same
        # cohort, without the snapshot holding either
        redact.check_fingerprints(fingerprints, query.to_json())
        if recorded != redact.describe():
            raise SnapshotError("redact= is not the policy the snapshot was made with")
    elif redact is not None:
        raise SnapshotError("the snapshot is not redacted; pass redact=None")
    recorded_query = _recorded_query(prov)
    if query is None:
        if recorded_query is None:
            raise SnapshotError("no readable query in the provenance: pass query= to refresh")
        query = recorded_query
    elif not redaction and recorded_query is not None and recorded_query != query:
        raise SnapshotError(
            "query= is not the query the snapshot was made with: refreshing would mix two "
            "cohorts; export the new query to a new path"
        )
    if query.row_limit is not None:
        raise SnapshotError(
            "a query with a limit cannot be refreshed incrementally (the first N rows can change "
            "in ways an update scan does not show); export it again"
        )
    if prov.get("datastore_id") not in (None, query.datastore_id):
        raise SnapshotError("query= is for a different datastore than the snapshot")
    for needed in ("imageSetId", "version", "updatedAt"):
        if needed not in table.column_names:
            raise SnapshotError(f"cannot refresh without the {needed} column")
    return query


def apply_fetched(
    table: pa.Table,
    prov: dict[str, Any],
    query: Query,
    redact: RedactionPolicy | None,
    fetched: pa.Table,
    client: Any,
    started: datetime,
    since: datetime,
) -> _Change:
    """*table* with *fetched* (image sets as the service returned them, unfiltered) merged in.

    Newer states replace older ones (an older state never replaces a newer one), matching rows
    are added, rows that stopped matching leave; *fetched* need not be the whole datastore.
    """
    fetched_count = fetched.num_rows

    old_ids = table.column("imageSetId")
    old_versions = dict(zip(old_ids.to_pylist(), table.column("version").to_pylist(), strict=True))
    old_updated = dict(zip(old_ids.to_pylist(), table.column("updatedAt").to_pylist(), strict=True))
    # an older state than the one held (a stale read) never replaces it; same order as
    # _latest_versions: version, then updatedAt, nulls lowest
    newer = pa.array(
        [
            i not in old_versions
            or frame.rank_of(v, u) >= frame.rank_of(old_versions[i], old_updated[i])
            for i, v, u in zip(
                fetched.column("imageSetId").to_pylist(),
                fetched.column("version").to_pylist(),
                fetched.column("updatedAt").to_pylist(),
                strict=True,
            )
        ],
        pa.bool_(),
    )
    fetched = fetched.filter(newer)
    matching = frame.apply_predicates(fetched, query.predicates)
    replaced = pc.is_in(old_ids, value_set=fetched.column("imageSetId").combine_chunks())
    kept = table.filter(pc.invert(pc.fill_null(replaced, False)))
    incoming = _as_stored(matching, table, redact)
    merged = pa.concat_tables([kept, incoming])
    result = frame.order(frame.latest_rows(merged), query.compile())

    new_ids = set(result.column("imageSetId").to_pylist())
    before = set(old_versions)
    incoming_ids = incoming.column("imageSetId").to_pylist()
    incoming_state = dict(
        zip(
            incoming_ids,
            zip(
                incoming.column("version").to_pylist(),
                incoming.column("updatedAt").to_pylist(),
                strict=True,
            ),
            strict=True,
        )
    )
    added = sorted(new_ids - before)
    removed = sorted(before - new_ids)
    updated = sorted(
        i
        for i in new_ids & before
        if i in incoming_state and incoming_state[i] != (old_versions[i], old_updated[i])
    )
    # same version, yet storageTier or lastAccessedAt moved (an access): kept as last read
    same = [i for i in new_ids & before if i in incoming_state and i not in set(updated)]
    retiered = sorted(set(same) & _tier_changes(table, incoming, same))
    watermark = table_watermark(result)
    new_prov = provenance.refreshed(prov, client, started, since)
    # unchanged rows keep the tiers of the last full read (export or reconcile)
    new_prov["tiers_observed_at"] = tiers_observed_at(prov)
    new_prov.update({"row_count": result.num_rows, "watermark": iso(watermark)})
    report = RefreshReport(
        tuple(added),
        tuple(updated),
        tuple(removed),
        fetched_count,
        since,
        result.num_rows,
        watermark,
        retiered=tuple(retiered),
    )
    # what a MERGE needs: the rows that are new or newer, still in the cohort after the merge
    ids = set(added) | set(updated) | set(retiered)
    keep = pc.is_in(result.column("imageSetId"), value_set=pa.array(sorted(ids), pa.string()))
    changed_rows = result.filter(keep)
    return _Change(result, changed_rows, new_prov, report)


def reconciled(
    table: pa.Table,
    prov: dict[str, Any],
    query: Query,
    redact: RedactionPolicy | None,
    run: engine.Run,
) -> _Change:
    """*table* made equal to a fresh run of *query*: the backstop of refreshes and events.

    Reads every matching image set's summary through the query's own plan (SearchImageSets, or
    its QIDO-RS step: no metadata access), then: new IDs are added, newer states replace older
    ones, rows whose storageTier or lastAccessedAt changed at the same version are replaced
    (neither moves updatedAt, so no incremental refresh sees them), rows not in the fresh result
    (deleted, or no longer matching) leave. A stored state newer than the one read (a search
    index lagging a write) is kept.
    """
    started = datetime.now(timezone.utc)
    plan = engine.choose(lambda stats: query.compile(stats=stats), run)
    fresh, _ = engine.collect_table(plan, query.to_json(), run)
    incoming = _as_stored(fresh, table, redact)

    def states(rows: pa.Table) -> dict[str, tuple[Any, ...]]:
        tiers = [
            rows.column(c).to_pylist() if c in rows.column_names else [None] * rows.num_rows
            for c in ("storageTier", "lastAccessedAt")
        ]
        return {
            i: (v, u, t, a)
            for i, v, u, t, a in zip(
                rows.column("imageSetId").to_pylist(),
                rows.column("version").to_pylist(),
                rows.column("updatedAt").to_pylist(),
                *tiers,
                strict=True,
            )
        }

    old, new = states(table), states(incoming)
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    both = new.keys() & old.keys()
    stored_newer = {i for i in both if frame.rank_of(*old[i][:2]) > frame.rank_of(*new[i][:2])}
    updated = sorted(i for i in both - stored_newer if old[i][:2] != new[i][:2])
    retiered = sorted(
        i for i in both - stored_newer if old[i][:2] == new[i][:2] and old[i][2:] != new[i][2:]
    )

    def having(rows: pa.Table, ids: set[str] | list[str]) -> pa.Array:
        values = pa.array(sorted(ids), pa.string())
        return pc.fill_null(pc.is_in(rows.column("imageSetId"), value_set=values), False)

    kept = table.filter(having(table, stored_newer))
    fresh_rows = incoming.filter(pc.invert(having(incoming, stored_newer)))
    result = frame.order(pa.concat_tables([kept, fresh_rows]), query.compile())
    changed_rows = incoming.filter(having(incoming, set(added) | set(updated) | set(retiered)))
    moment = started.isoformat()
    new_prov = provenance.refreshed(prov, run.client, started, started)
    watermark = table_watermark(result)
    new_prov.update(
        {
            "row_count": result.num_rows,
            "watermark": iso(watermark),
            "reconciled_at": moment,
            "tiers_observed_at": moment,
        }
    )
    report = RefreshReport(
        tuple(added),
        tuple(updated),
        tuple(removed),
        fresh.num_rows,
        started,
        result.num_rows,
        watermark,
        retiered=tuple(retiered),
        reconciled=True,
    )
    return _Change(result, changed_rows, new_prov, report)


def _as_stored(rows: pa.Table, table: pa.Table, redact: RedactionPolicy | None) -> pa.Table:
    """*rows* (as the service returned them) as *table* holds rows: redacted, its columns, typed."""
    rows_df = schema.arrow_to_pandas(rows)
    if redact is not None:
        rows_df = apply_redaction(rows_df, redact)
    stored = frame_to_table(rows_df[[c for c in table.column_names if c in rows_df]])
    missing = [c for c in table.column_names if c not in stored.column_names]
    if missing:
        raise SnapshotError(f"cannot refresh columns not in the schema: {', '.join(missing)}")
    return stored.select(table.column_names).cast(table.schema)


def _tier_changes(old: pa.Table, new: pa.Table, ids: list[str]) -> set[str]:
    """Those of *ids* whose storageTier or lastAccessedAt differ between *old* and *new*."""
    if not ids:
        return set()
    wanted = pa.array(sorted(ids), pa.string())

    def tiers(rows: pa.Table) -> dict[str, tuple[Any, Any]]:
        rows = rows.filter(
            pc.fill_null(pc.is_in(rows.column("imageSetId"), value_set=wanted), False)
        )
        values = [
            rows.column(c).to_pylist() if c in rows.column_names else [None] * rows.num_rows
            for c in ("storageTier", "lastAccessedAt")
        ]
        return dict(
            zip(rows.column("imageSetId").to_pylist(), zip(*values, strict=True), strict=True)
        )

    before, after = tiers(old), tiers(new)
    return {i for i in ids if before.get(i) != after.get(i)}


def _recorded_query(prov: dict[str, Any]) -> Query | None:
    """The query a plain snapshot was made with, or None if it has none that can be read."""
    text = prov.get("query")
    if not isinstance(text, str):
        return None
    try:
        return Query.from_dict(json.loads(text))
    except (HealthImagingDFError, ValueError, TypeError, KeyError, AttributeError):
        return None


def tiers_observed_at(prov: dict[str, Any]) -> str | None:
    """When the oldest storageTier of a snapshot was read: its last full read's start."""
    recorded = prov.get("tiers_observed_at")
    if isinstance(recorded, str):
        return recorded
    if prov.get("refreshed_since"):
        return None  # refreshed by an older version, which kept no record
    for key in ("fetch_started_at", "fetched_at"):
        value = prov.get(key)
        if isinstance(value, str):
            return value
    return None


def _refresh_since(prov: dict[str, Any], table: pa.Table, margin: timedelta) -> datetime:
    """Lower updatedAt bound of a refresh: when the last fetch started, minus *margin*.

    Any change the snapshot misses happened after its fetch started, so its updatedAt is later
    (up to clock skew, which *margin* covers). The highest updatedAt seen (the watermark) is not
    used on its own: a change made while a long export ran can carry an earlier updatedAt than
    rows read later, and a small cohort's watermark can lag far behind the datastore's activity.
    """
    for key in ("fetch_started_at", "fetched_at"):
        moment = parse_iso(prov.get(key))
        if moment is not None:
            return moment - margin
    watermark = parse_iso(prov.get("watermark")) or table_watermark(table)
    if watermark is None:
        raise SnapshotError("the frame has no fetch time or updatedAt to refresh from")
    return watermark - margin
