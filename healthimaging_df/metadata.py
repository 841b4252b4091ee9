"""Series- and instance-level DICOM attributes from GetImageSetMetadata, as a long frame.

SearchImageSets summarizes an image set with a handful of tags; GetImageSetMetadata returns its whole
DICOM header tree as gzip JSON (``Patient``, ``Study``, ``Study.Series[uid].Instances[uid]``, each
with a ``DICOM`` object keyed by keyword). ``fetch_metadata`` calls it once per image set, from a
pool of threads paced by the same rate limiter the search uses, and flattens the series (or
instances) into rows keyed by ``imageSetId``, ``version``, ``SeriesInstanceUID`` (and
``SOPInstanceUID``), with one column per DICOM keyword found. Each document is parsed (orjson)
and flattened column-wise in its worker as it arrives, with the cyclic garbage collector paused
(``aws.documents.collector_paused``), and dropped: memory follows the output rows, CPU stays
well under the quota's needs for series of hundreds of instances.

Each call is an *access*: it moves an ARCHIVE_INSTANT_ACCESS image set back to the frequent (more
expensive) tier. The archive guard therefore knows every image set's tier before the first call:

- the frame's ``storageTier`` is used when it is *current*: the frame's provenance says it was
  fetched (``fetch_started_at``, else ``fetched_at``) at most ``TIER_MAX_AGE`` (15 minutes) ago
  and it is no refreshed snapshot (a refresh re-reads changed rows only, so the others keep the
  tier of an older fetch). A row shown ARCHIVE_INSTANT_ACCESS counts as archived at any age;
- every other tier (no ``storageTier`` column, a missing value, or a FREQUENT_ACCESS that is not
  current) is *stale* and is looked up first with GetImageSet, which returns ``storageTier`` and is
  not an access, paced under its own quota (25 calls/s);
- any archived image set, shown by the frame or found by a look-up, makes ``fetch_metadata``
  refuse (``ArchiveAccessError``, naming the count) before any GetImageSetMetadata call: never
  without explicit opt-in. ``allow_archive_access=True`` is that opt-in: it skips the look-ups,
  reads everything and warns once of what may move.

``dry_run=True`` counts the calls, the look-ups, and the archived image sets an opt-in would move,
without sending any.

This module is the public face (options, dry run, the call); the run is ``engine.enrichment``,
the documents' calls and parsing ``aws.documents``, documents to rows ``engine.document_rows``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import pandas as pd

from healthimaging_df import aws
from healthimaging_df.core import checks
from healthimaging_df.core.frames import require, with_attrs
from healthimaging_df.core.progress import Progress, ProgressReporter
from healthimaging_df.engine import enrichment
from healthimaging_df.engine.document_rows import Level, flatten_document
from healthimaging_df.engine.enrichment import (
    ARCHIVED,
    ERROR_COLUMN,
    OPERATION,
    TIER_MAX_AGE,
    TIER_OPERATION,
    TIER_TPS,
    OnError,
    tier_is_current,
)
from healthimaging_df.errors import ArchiveAccessWarning, MetadataFetchError

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from healthimaging_df.options import MetadataOptions

__all__ = [
    "ARCHIVED",
    "ERROR_COLUMN",
    "TIER_MAX_AGE",
    "ArchiveAccessWarning",
    "Level",
    "MetadataPlan",
    "MetadataProgress",
    "OnError",
    "fetch_metadata",
    "flatten_document",
    "tier_is_current",
]

MetadataProgress = Progress  # a callable gets (done, total)


@dataclass(frozen=True)
class MetadataPlan:
    """What ``fetch_metadata`` would do: the answer of ``dry_run=True`` (nothing is sent).

    Attributes
    ----------
    calls
        GetImageSetMetadata calls (one per distinct imageSetId and version).
    archived
        How many of those image sets the frame shows ARCHIVE_INSTANT_ACCESS (each call moves one
        back to the frequent tier).
    max_tps
        The client-side rate limit the calls would run under.
    stale
        Image sets whose tier the frame does not tell (no ``storageTier``, or not current): a
        real run looks them up with GetImageSet first (``lookups``), unless
        ``allow_archive_access=True``.
    lookups
        GetImageSet calls a real run makes first (not accesses), at up to 25/s.
    allowed
        Whether the run would opt in (``allow_archive_access=True``): without it, any archived
        image set makes the run refuse; ``archived`` is what an opt-in would move.
    """

    calls: int
    archived: int
    max_tps: float
    stale: int = 0
    lookups: int = 0
    allowed: bool = False

    @property
    def estimated_seconds(self) -> float:
        """Lower bound of the run time at ``max_tps`` (look-ups at up to 25/s included)."""
        return self.calls / self.max_tps + self.lookups / min(TIER_TPS, self.max_tps)

    def __str__(self) -> str:
        text = (
            f"fetch_metadata would make {self.calls} {OPERATION} call(s) at up to "
            f"{self.max_tps:g}/s (at least {self.estimated_seconds:.1f} s); {self.archived} "
            "archived image set(s) would move to FREQUENT_ACCESS"
        )
        if self.archived and not self.allowed:
            text += (
                " with allow_archive_access=True; without it the run refuses them before any call"
            )
        if self.lookups:
            text += (
                f"; {self.lookups} image set(s) without a current storageTier would first be "
                f"looked up with {TIER_OPERATION} (not an access), and the run refused if any is "
                "archived"
            )
        elif self.stale:
            text += (
                f"; {self.stale} image set(s) without a current storageTier would be read "
                "unchecked (allow_archive_access=True): any archived one would move too"
            )
        return text


@overload
def fetch_metadata(
    frame: pd.DataFrame, *, dry_run: Literal[False] = ..., **options: Unpack[MetadataOptions]
) -> pd.DataFrame: ...


@overload
def fetch_metadata(
    frame: pd.DataFrame, *, dry_run: Literal[True], **options: Unpack[MetadataOptions]
) -> MetadataPlan: ...


@overload
def fetch_metadata(
    frame: pd.DataFrame, *, dry_run: bool, **options: Unpack[MetadataOptions]
) -> pd.DataFrame | MetadataPlan: ...


def fetch_metadata(
    frame: pd.DataFrame,
    *,
    client: Any = None,
    boto3_session: Any = None,
    level: Level = "series",
    max_tps: float | None = aws.METADATA_TPS,
    max_concurrency: int | None = None,
    progress: MetadataProgress = None,
    dry_run: bool = False,
    on_error: OnError = "raise",
    datastore_id: str | None = None,
    allow_archive_access: bool = False,
) -> pd.DataFrame | MetadataPlan:
    """Call GetImageSetMetadata for each image set of *frame* and return its DICOM attributes.

    Parameters
    ----------
    frame
        Image sets (``imageSetId``, and ``version`` to read that version; ``storageTier``, with
        the provenance of a fetch less than 15 minutes old, spares the tier look-ups). One call
        per distinct (imageSetId, version).
    client, boto3_session
        As in ``Query.to_dataframe``.
    level
        ``"series"``: one row per series (series attributes, the instance attributes all its
        instances share, ``NumberOfSeriesRelatedInstances``); ``"instance"``: one row per
        instance, keyed by ``SOPInstanceUID`` too.
    max_tps
        Calls per second across all threads (the service's default quota is 50); None for no
        client-side limit.
    max_concurrency
        Calls in flight at once; None (the default): enough to keep the quota busy, the paced
        rate times the round trip measured on the endpoint plus a margin, at most 64.
    progress
        True for a tqdm bar, False for none, a callable ``(done, total)``, or None for a bar
        in a terminal or notebook outside CI.
    dry_run
        Send nothing; return a :class:`MetadataPlan` saying how many calls would be made.
    on_error
        ``"raise"``: after every call has finished, raise ``MetadataFetchError`` listing the
        image sets that failed (imageSetId -> error code). ``"report"``: return them as rows
        with the error code in a ``metadataError`` column (NA on rows that succeeded).
    datastore_id
        Defaults to the one in the frame's provenance (``attrs``).
    allow_archive_access
        The archive guard (module docstring). False (default): any archived image set makes the
        call refuse before any GetImageSetMetadata call; image sets without a current
        ``storageTier`` are looked up with GetImageSet (not an access, up to 25/s) first. True:
        the opt-in: no look-ups, every image set is read (with a warning), archived ones move
        to FREQUENT_ACCESS.

    Returns
    -------
    DataFrame
        Keyed by ``imageSetId``, ``version``, ``SeriesInstanceUID`` (and ``SOPInstanceUID``),
        one column per DICOM keyword present, in frame order; ``attrs`` copied from *frame*.

    Raises
    ------
    QueryValidationError
        A bad option, a frame without ``imageSetId``, or no datastore_id to be found; raised
        before any call (also with ``dry_run=True``).
    ArchiveAccessError
        (A ``QueryValidationError``, field ``allow_archive_access``.) Archived image sets and no
        opt-in: raised before any GetImageSetMetadata call, naming their count.
    MetadataFetchError
        Some image sets failed and ``on_error="raise"``.
    SearchError
        A failure that concerns every call (access denied, no credentials, throttled after
        every retry): the fetch stops at once. A GetImageSet look-up that fails (other than
        for an image set that does not exist) raises one too, before any access.

    Warns
    -----
    ArchiveAccessWarning
        Once, with ``allow_archive_access=True``, when archived or unchecked image sets are
        about to be read (each call moves an archived one to the frequent tier).
    """
    checks.one_of("level", level, ("series", "instance"))
    checks.one_of("on_error", on_error, ("raise", "report"))
    checks.optional_positive_int("max_concurrency", max_concurrency)
    checks.optional_positive_number("max_tps", max_tps)
    checks.flag("dry_run", dry_run)
    checks.flag("allow_archive_access", allow_archive_access)
    require(frame, ("imageSetId",), "fetch_metadata()")
    targets = enrichment.targets_of(frame)
    stale = enrichment.stale_targets(targets, tier_is_current(frame))
    if dry_run:
        return MetadataPlan(
            calls=len(targets),
            archived=sum(t.tier == ARCHIVED for t in targets),
            max_tps=max_tps or float("inf"),
            stale=len(stale),
            lookups=0 if allow_archive_access else len(stale),
            allowed=allow_archive_access,
        )
    store = enrichment.datastore_of(frame, datastore_id)
    client = aws.make_client(client, boto3_session, max_concurrency or aws.MAX_CONCURRENCY)
    with aws.pacing(client):  # our botocore handlers stay on the client for this call only
        warning = enrichment.archive_guard(
            client,
            store,
            targets,
            stale,
            allow_archive_access,
            max_tps,
            max_concurrency,
            progress,
            age=enrichment.tier_age(frame),
        )
        if warning is not None:
            warnings.warn(warning, ArchiveAccessWarning, stacklevel=3)
        blocks, failures = enrichment.fetch_all(
            client,
            store,
            targets,
            level,
            max_tps,
            max_concurrency,
            ProgressReporter(progress, OPERATION, " image sets", total=len(targets)),
        )
    if failures and on_error == "raise":
        raise MetadataFetchError({targets[p].image_set_id: code for p, code in failures.items()})
    return with_attrs(enrichment.result_frame(targets, blocks, failures, level, on_error), frame)
