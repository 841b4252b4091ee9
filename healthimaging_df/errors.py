"""Every exception the library raises, under one base class.

Messages name the field, the rule and a value's position, never the value itself: DICOM values are
PHI (patient IDs, names, UIDs), and exception messages end up in logs and tracebacks.
"""

from __future__ import annotations


class HealthImagingDFError(Exception):
    """Base class of every error raised by ``healthimaging_df``."""


class QueryValidationError(HealthImagingDFError, ValueError):
    """A query breaks a rule; raised before any request is sent.

    Parameters
    ----------
    field
        The column or argument at fault (``"PatientID"``, ``"limit"``).
    rule
        The rule that was broken, in words.
    position
        Which value broke it (0-based index in a list of values), when there are several;
        the message counts from 1 (``value #1`` is position 0).
    """

    def __init__(self, field: str, rule: str, position: int | None = None) -> None:
        self.field = field
        self.rule = rule
        self.position = position
        where = f" (value #{position + 1})" if position is not None else ""
        super().__init__(f"{field}{where}: {rule}")


class SearchError(HealthImagingDFError):
    """A request to the service failed and could not be recovered by retrying.

    The service's own message is kept in ``server_message`` but left out of ``str(error)``, because a
    service may echo request values (PHI) in it.

    Parameters
    ----------
    operation
        The API operation, e.g. ``"SearchImageSets"``.
    request_index
        The index of the request chain (in ``Query.plan()`` order) or of the image set that failed.
    code
        The service's error code (``ValidationException``, ``ThrottlingException``...).
    status
        The HTTP status code, when there was a response.
    server_message
        The service's message, withheld from ``str()``.
    detail
        Extra words of ours (never request values).
    """

    def __init__(
        self,
        operation: str,
        request_index: int | None,
        code: str,
        status: int | None = None,
        server_message: str | None = None,
        detail: str = "",
    ) -> None:
        self.operation = operation
        self.request_index = request_index
        self.code = code
        self.status = status
        self.server_message = server_message
        at = f" request #{request_index}" if request_index is not None else ""
        http = f" (HTTP {status})" if status is not None else ""
        extra = f": {detail}" if detail else ""
        super().__init__(f"{operation}{at} failed with {code}{http}{extra}")


class ThrottledError(SearchError):
    """The service kept throttling after every retry; lower ``max_tps`` or ask for a higher quota."""


class PaginationError(SearchError):
    """The service broke the pagination contract (e.g. handed back a nextToken it already gave)."""


class MalformedResponseError(SearchError):
    """A response broke the service model (truncated, not JSON, wrong types): retry it like a 5xx.

    ``rule`` names the rule that was broken; neither it nor the message quotes response values.
    """

    def __init__(
        self,
        rule: str,
        request_index: int | None = None,
        status: int | None = None,
        operation: str = "SearchImageSets",
    ) -> None:
        self.rule = rule
        super().__init__(operation, request_index, "MalformedResponse", status, detail=rule)


class SnapshotError(HealthImagingDFError):
    """A Parquet snapshot could not be written, read or refreshed."""


class SnapshotConflictError(SnapshotError):
    """Another writer committed to the same Delta table first; this commit was not made.

    The table holds the other writer's version, whole and readable. Read it again and redo the
    change (``healthimaging_df.store.delta.retry_on_conflict`` does this for a read-modify-write).
    """


class MetadataFetchError(HealthImagingDFError):
    """GetImageSetMetadata failed for some image sets; ``failures`` maps imageSetId to error code."""

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = dict(failures)
        codes = sorted(set(self.failures.values()))
        super().__init__(
            f"GetImageSetMetadata failed for {len(self.failures)} image set(s): {', '.join(codes)}"
        )


class HealthImagingDFWarning(UserWarning):
    """Base class of every warning ``healthimaging_df`` gives."""


class ArchiveAccessWarning(HealthImagingDFWarning):
    """Reading metadata of ARCHIVE_INSTANT_ACCESS image sets moves them to the frequent tier."""


class DICOMwebError(SearchError):
    """A DICOMweb (QIDO-RS) request failed and could not be recovered by retrying.

    ``operation`` is ``SearchDICOMStudies``, ``SearchDICOMSeries`` or ``SearchDICOMInstances``.
    Neither the request's URL nor its query appears in the text: query values are PHI.
    """


class DICOMwebThrottledError(DICOMwebError, ThrottledError):
    """QIDO-RS kept answering 429/503 after every retry; lower ``max_tps``."""


class DICOMwebTruncatedError(DICOMwebError):
    """A QIDO-RS result may be incomplete: a full page at the record cap or at the largest offset.

    Parameters
    ----------
    operation
        The QIDO-RS operation.
    records
        How many records were read before the service stopped giving more.
    reason
        Why the result may be incomplete, in words (never values).
    """

    def __init__(self, operation: str, records: int, reason: str) -> None:
        self.records = records
        self.reason = reason
        super().__init__(
            operation,
            None,
            "MaybeTruncated",
            detail=f"{records} record(s) read; {reason}: narrow the query (e.g. by StudyDate)",
        )


class DICOMwebMalformedError(DICOMwebError):
    """QIDO-RS kept answering with a body that is not a page of DICOM JSON, after every retry.

    A zero-byte 200, a JSON object instead of a list, an element that is not a DICOM JSON object,
    or a record without the UID the search needs. ``rule`` names what was broken (no values).
    """

    def __init__(self, operation: str, rule: str, status: int | None = None) -> None:
        self.rule = rule
        super().__init__(operation, None, "MalformedResponse", status, detail=rule)


class DICOMwebUnavailableError(DICOMwebError):
    """QIDO-RS cannot be used here: no DICOMweb endpoint is known, or the extra is missing.

    Raised for a forced ``using("qido")``; ``auto`` runs SearchImageSets alone.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__("SearchDICOM", None, "Unavailable", detail=reason)


class DICOMwebUnavailableWarning(HealthImagingDFWarning):
    """QIDO-RS was denied, absent or broken: the query ran on SearchImageSets alone (exact).

    Said once per DICOMweb endpoint and region in a process; the finding is remembered (in the
    statistics cache, for an hour) and ``explain()`` shows it. The message names the reason (an
    error code and HTTP status), never a URL or a query value.
    """
