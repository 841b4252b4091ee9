"""Storage errors as ``SnapshotError``: without the storage layer's text, which quotes paths.

Partition folders are named after values (``PatientID=...`` is PHI) and delta-rs, pyiceberg,
pyarrow and botocore put paths, keys and URLs in their messages: every error that leaves a store
goes through :func:`translated`, which keeps only the kind of failure.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

import pyarrow as pa

from healthimaging_df.errors import HealthImagingDFError, SnapshotConflictError, SnapshotError

CONFLICT_HELP = (
    "another writer committed to this snapshot first; nothing of this write was committed and "
    "the table holds the other writer's version. Read it again and redo the change"
)


def _conflict_types() -> tuple[type[BaseException], ...]:
    """The commit-conflict exceptions of the table libraries that are installed."""
    found: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from deltalake.exceptions import CommitFailedError

        found.append(CommitFailedError)
    with contextlib.suppress(ImportError):
        from pyiceberg.exceptions import CommitFailedException, ValidationException

        found += [CommitFailedException, ValidationException]
    return tuple(found)


_OUTAGE = "the storage did not answer (network or S3 outage); try again"
# botocore's exceptions for a storage that does not answer (by name: no botocore import here)
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "HTTPClientError",
}


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn table-library, pyarrow, OS and botocore errors into ``SnapshotError`` (no text)."""
    try:
        yield
    except HealthImagingDFError:
        raise
    except Exception as exc:
        raise translate(exc, action) from None


def translate(exc: BaseException, action: str) -> SnapshotError:
    """The ``SnapshotError`` for *exc* raised while doing *action*; its text is not kept."""
    if isinstance(exc, _conflict_types()):
        return SnapshotConflictError(f"{action}: {CONFLICT_HELP}")
    name = type(exc).__name__
    if name in ("TableNotFoundError", "NoSuchTableError"):
        return SnapshotError(f"{action}: there is no table there")
    if name == "DeltaProtocolError":
        return SnapshotError(
            f"{action}: the table needs Delta features this deltalake cannot handle; upgrade it"
        )
    return SnapshotError(f"{action} failed: {kind(exc)}")


def kind(exc: BaseException) -> str:
    """A description of *exc* that quotes nothing of its message but well-known causes."""
    text = str(exc).lower()
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "no space left" in text:
        return "no space left on the device"
    lineage = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, ConnectionError) or lineage & _UNREACHABLE:
        # before the words below: botocore's text quotes the URL, and so any key's words
        return _OUTAGE
    if "json" in text or "_delta_log" in text or "checkpoint" in text or "log segment" in text:
        return "the table's transaction log is damaged"
    damaged = ("magic bytes", "corrupt", "truncated", "out of specification", "eof")
    if isinstance(exc, pa.ArrowInvalid) or any(word in text for word in damaged):
        return "a data file of the table is damaged or truncated"
    if isinstance(exc, FileNotFoundError) or "not found" in text or "no such file" in text:
        return "a file of the table is missing (deleted by hand, or vacuumed away)"
    if isinstance(exc, PermissionError) or "access denied" in text or "forbidden" in text:
        return "access denied by the file system or S3"
    if "parquet" in text or isinstance(exc, pa.ArrowIOError):
        return "a data file of the table is damaged or truncated"
    outage = ("timeout", "timed out", "connect", "dns", "503", "endpoint", "unreachable")
    if any(word in text for word in outage):
        return _OUTAGE
    return f"{type(exc).__name__} from the storage layer"
