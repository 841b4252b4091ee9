"""The one declared schema of an image-set frame; dtypes, Parquet schema and docs derive from it.

Column names are the vocabulary of ``Query.where``/``between``/``sort_by`` and of the DataFrame alike:
AWS field names for image-set fields, standard DICOM keywords for DICOM tags, so frames join with
pydicom, idc-index and other DICOM tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # pandas and pyarrow load on first use: the CLI's --help and --explain skip them
    import pandas as pd
    import pyarrow as pa

SCHEMA_VERSION = "1"

Kind = Literal["string", "int", "bool", "timestamp", "wallclock"]
Level = Literal["patient", "study", "series", "image_set"]
Pushdown = Literal["id", "flag", "range"]
Deid = Literal["keep", "drop", "hash", "year", "shift"]
DtypeBackend = Literal["numpy_nullable", "pyarrow"]
DTYPE_BACKENDS: tuple[DtypeBackend, ...] = ("numpy_nullable", "pyarrow")


@cache
def _arrow_types() -> dict[Kind, pa.DataType]:
    """Arrow type of each kind, built on first use (importing pyarrow costs ~0.1 s)."""
    import pyarrow as pa

    return {
        "string": pa.string(),
        "int": pa.int64(),
        "bool": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
        "wallclock": pa.timestamp("us"),
    }


@dataclass(frozen=True)
class Column:
    """One column of the frame.

    Attributes
    ----------
    name
        Column name (AWS field name or DICOM keyword).
    source
        Where it comes from in an ``ImageSetsMetadataSummary``: ``("version",)`` or
        ``("DICOMTags", "DICOMPatientId")``; empty for derived columns.
    kind
        ``string``, ``int``, ``bool``, ``timestamp`` (UTC instant) or ``wallclock`` (DICOM local
        date-time with no zone).
    description
        One line for the docs table.
    phi
        The value identifies or describes a patient; never log it.
    search_key
        The ``SearchByAttributeValue`` key when the API can filter on this column, else ``None``.
    search_operator
        ``EQUAL`` or ``BETWEEN``: how the API can filter on it.
    sort_field
        The API's ``sortField`` for this column, when it can sort by it.
    max_length
        The API's length limit for a string filter value.
    uid
        Values must be DICOM UIDs (digits and dots).
    level
        The DICOM level the value describes: ``patient``, ``study``, ``series`` or ``image_set``;
        the cohort tables (studies, patients) are built from it.
    pushdown
        How the planner can send a condition on it: ``id`` (an EQUAL that pins a few image sets),
        ``flag`` (an EQUAL on a flag), ``range`` (a BETWEEN); None for client-side only.
    rank
        The planner's preference among columns of the same push-down role (0 first): the most
        selective ID, the range the service is known to accept best.
    deid
        What a default redaction policy does with it: ``keep``, ``drop``, ``hash`` (keyed
        pseudonym), ``year`` (keep the year only) or ``shift`` (per-patient date shift).
    shown
        Shown by default where a few columns must do (the CLI's table, the demo).
    """

    name: str
    source: tuple[str, ...]
    kind: Kind
    description: str
    phi: bool = False
    search_key: str | None = None
    search_operator: Literal["EQUAL", "BETWEEN"] | None = None
    sort_field: str | None = None
    max_length: int | None = None
    uid: bool = False
    level: Level = "image_set"
    pushdown: Pushdown | None = None
    rank: int = 0
    deid: Deid = "keep"
    shown: bool = False

    @property
    def arrow_type(self) -> pa.DataType:
        """Arrow type of the column."""
        return _arrow_types()[self.kind]


def _tag(
    name: str, key: str, kind: Kind, description: str, level: Level, **extra: object
) -> Column:
    return Column(name, ("DICOMTags", key), kind, description, phi=True, level=level, **extra)  # type: ignore[arg-type]


def _id_tag(
    name: str, key: str, description: str, level: Level, *, rank: int, **extra: object
) -> Column:
    """A tag that identifies a patient, study or series.

    The API matches it EQUAL (values up to 512 characters), the planner pushes it as an ``id``
    (*rank*: its preference among them, 0 first), a redaction hashes it.
    """
    return _tag(
        name,
        key,
        "string",
        description,
        level,
        search_key=key,
        search_operator="EQUAL",
        max_length=512,
        pushdown="id",
        rank=rank,
        deid="hash",
        **extra,
    )


COLUMNS: tuple[Column, ...] = (
    Column(
        "imageSetId",
        ("imageSetId",),
        "string",
        "Image set identifier (32 hex characters).",
        shown=True,
    ),
    Column("version", ("version",), "int", "Latest version of the image set."),
    Column(
        "createdAt",
        ("createdAt",),
        "timestamp",
        "When the image set was created (UTC); never changes.",
        search_key="createdAt",
        search_operator="BETWEEN",
        sort_field="createdAt",
        pushdown="range",
        rank=1,
    ),
    Column(
        "updatedAt",
        ("updatedAt",),
        "timestamp",
        "When the image set was last updated (UTC).",
        search_key="updatedAt",
        search_operator="BETWEEN",
        sort_field="updatedAt",
        pushdown="range",
        rank=2,
    ),
    Column("lastAccessedAt", ("lastAccessedAt",), "timestamp", "When it was last accessed (UTC)."),
    Column(
        "storageTier",
        ("storageTier",),
        "string",
        "FREQUENT_ACCESS or ARCHIVE_INSTANT_ACCESS.",
    ),
    Column(
        "isPrimary",
        ("isPrimary",),
        "bool",
        "False for image sets holding conflicting (non-primary) copies.",
        search_key="isPrimary",
        search_operator="EQUAL",
        pushdown="flag",
        shown=True,
    ),
    _id_tag(
        "PatientID", "DICOMPatientId", "Patient ID (0010,0020).", "patient", rank=3, shown=True
    ),
    _tag(
        "PatientName",
        "DICOMPatientName",
        "string",
        "Patient's name (0010,0010).",
        "patient",
        deid="drop",
    ),
    _tag(
        "PatientBirthDate",
        "DICOMPatientBirthDate",
        "string",
        "Patient's birth date (0010,0030), raw DICOM DA (YYYYMMDD).",
        "patient",
        deid="year",
    ),
    _tag(
        "PatientSex", "DICOMPatientSex", "string", "Patient's sex (0010,0040): M, F, O.", "patient"
    ),
    _id_tag(
        "StudyInstanceUID",
        "DICOMStudyInstanceUID",
        "Study Instance UID (0020,000D).",
        "study",
        rank=1,
        uid=True,
    ),
    _id_tag("StudyID", "DICOMStudyId", "Study ID (0020,0010).", "study", rank=4),
    _tag(
        "StudyDescription",
        "DICOMStudyDescription",
        "string",
        "Study description (0008,1030).",
        "study",
    ),
    _tag(
        "NumberOfStudyRelatedSeries",
        "DICOMNumberOfStudyRelatedSeries",
        "int",
        "Number of series in the study (0020,1206).",
        "study",
    ),
    _tag(
        "NumberOfStudyRelatedInstances",
        "DICOMNumberOfStudyRelatedInstances",
        "int",
        "Number of instances in the study (0020,1208).",
        "study",
    ),
    _id_tag(
        "AccessionNumber", "DICOMAccessionNumber", "Accession number (0008,0050).", "study", rank=2
    ),
    _id_tag(
        "SeriesInstanceUID",
        "DICOMSeriesInstanceUID",
        "Series Instance UID (0020,000E).",
        "series",
        rank=0,
        uid=True,
    ),
    _tag(
        "Modality",
        "DICOMSeriesModality",
        "string",
        "Series modality (0008,0060): CT, MR...",
        "series",
        shown=True,
    ),
    _tag(
        "BodyPartExamined",
        "DICOMSeriesBodyPart",
        "string",
        "Body part examined (0018,0015).",
        "series",
        shown=True,
    ),
    _tag("SeriesNumber", "DICOMSeriesNumber", "int", "Series number (0020,0011).", "series"),
    _tag(
        "StudyDate",
        "DICOMStudyDate",
        "string",
        "Study date (0008,0020), raw DICOM DA.",
        "study",
        deid="shift",
    ),
    _tag("StudyTime", "DICOMStudyTime", "string", "Study time (0008,0030), raw DICOM TM.", "study"),
    Column(
        "StudyDateTime",
        (),
        "wallclock",
        "StudyDate + StudyTime read as strict DICOM DA/TM, a local date-time with no zone; a date "
        "without a time is that day's midnight; anything else (partial dates, colons) is NaT.",
        phi=True,
        search_key="DICOMStudyDateAndTime",
        search_operator="BETWEEN",
        sort_field="DICOMStudyDateAndTime",
        level="study",
        pushdown="range",
        rank=0,
        deid="shift",
        shown=True,
    ),
)

BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
COLUMN_NAMES: tuple[str, ...] = tuple(BY_NAME)
KEY_COLUMNS: tuple[str, ...] = ("imageSetId", "version", "PatientID", "StudyInstanceUID")
PHI_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.phi)


def _ranked(pushdown: Pushdown) -> tuple[str, ...]:
    return tuple(c.name for c in sorted(COLUMNS, key=lambda c: c.rank) if c.pushdown == pushdown)


# Everything below is derived from the declarations above; nothing else keeps its own list.
ID_RANK: tuple[str, ...] = _ranked("id")  # the planner pins the first of these a query names
RANGE_RANK: tuple[str, ...] = _ranked("range")  # and pushes the first of these ranges
FLAG_COLUMNS: tuple[str, ...] = _ranked("flag")
DISPLAY_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.shown)
PATIENT_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.level == "patient")
STUDY_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.level == "study")


def deid_columns(role: Deid) -> tuple[str, ...]:
    """Columns a default redaction policy treats with *role* (``hash``, ``drop``...)."""
    return tuple(c.name for c in COLUMNS if c.deid == role)


def column(name: str) -> Column:
    """Return the column called *name*; raise ``KeyError`` listing the valid names otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown column {name!r}; valid columns: {', '.join(COLUMN_NAMES)}"
        ) from None


def arrow_schema() -> pa.Schema:
    """Arrow schema of the frame, in column order (also the Parquet schema of snapshots)."""
    import pyarrow as pa

    return pa.schema([pa.field(c.name, c.arrow_type) for c in COLUMNS])


def pandas_dtypes(dtype_backend: DtypeBackend = "numpy_nullable") -> dict[str, object]:
    """Map each column to its pandas dtype under *dtype_backend* (as in ``pandas.read_parquet``)."""
    import pandas as pd

    if dtype_backend == "pyarrow":
        return {c.name: pd.ArrowDtype(c.arrow_type) for c in COLUMNS}
    if dtype_backend != "numpy_nullable":
        raise ValueError(f"dtype_backend must be one of {DTYPE_BACKENDS}, not {dtype_backend!r}")
    nullable: dict[Kind, object] = {
        "string": pd.StringDtype("pyarrow"),
        "int": pd.Int64Dtype(),
        "bool": pd.BooleanDtype(),
        "timestamp": pd.DatetimeTZDtype("us", "UTC"),
        "wallclock": "datetime64[us]",
    }
    return {c.name: nullable[c.kind] for c in COLUMNS}


def arrow_to_pandas(
    table: pa.Table, dtype_backend: DtypeBackend = "numpy_nullable", *, release: bool = False
) -> pd.DataFrame:
    """Convert a table of (at least) the schema's columns to a frame with the schema's dtypes.

    Schema columns come first in schema order; extra columns follow with pyarrow's default mapping.
    *release* frees each Arrow column once converted (pyarrow's ``self_destruct``): the table is
    unusable afterwards, so pass it only a table object nothing else refers to.
    """
    import pandas as pd

    dtypes = pandas_dtypes(dtype_backend)
    options = {"self_destruct": True, "split_blocks": True} if release else {}
    if dtype_backend == "pyarrow":
        frame = table.to_pandas(types_mapper=pd.ArrowDtype, **options)
    else:
        frame = table.to_pandas(types_mapper=pandas_type, **options)
    ordered = [n for n in COLUMN_NAMES if n in frame.columns]
    rest = [n for n in frame.columns if n not in BY_NAME]
    frame = frame[ordered + rest]
    typed: pd.DataFrame = frame.astype({n: dtypes[n] for n in ordered})
    return typed


def pandas_type(arrow_type: pa.DataType) -> object | None:
    """The nullable pandas dtype of an Arrow type: the ``types_mapper`` every frame is built with.

    Text -> ``string[pyarrow]``, integers -> ``Int64``, booleans -> ``boolean``, floats ->
    ``Float64``, dates and nested types (lists, structs) -> ``pd.ArrowDtype``; None (pyarrow's own
    mapping) for the rest, timestamps included, which :func:`arrow_to_pandas` types from the schema.
    The one mapper of the package: frames, enrichment and QIDO-RS results share it.
    """
    import pandas as pd
    import pyarrow as pa

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return pd.StringDtype("pyarrow")
    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    if pa.types.is_floating(arrow_type):
        return pd.Float64Dtype()
    if pa.types.is_nested(arrow_type) or pa.types.is_date(arrow_type):
        return pd.ArrowDtype(arrow_type)
    return None


def empty_frame(dtype_backend: DtypeBackend = "numpy_nullable") -> pd.DataFrame:
    """A frame with no rows and every column, typed: what an empty result looks like."""
    return arrow_to_pandas(arrow_schema().empty_table(), dtype_backend)


def markdown_table() -> str:
    """The schema as a Markdown table (``docs/schema.md`` is generated from this)."""
    rows = [
        "| column | source | type | level | API filter | redaction | description |",
        "|---|---|---|---|---|---|---|",
    ]
    numpy_types = pandas_dtypes("numpy_nullable")
    for c in COLUMNS:
        source = ".".join(c.source) if c.source else "derived"
        api = f"{c.search_operator} `{c.search_key}`" if c.search_key else "client-side"
        rows.append(
            f"| `{c.name}` | `{source}` | `{numpy_types[c.name]}` | {c.level.replace('_', ' ')} "
            f"| {api} | {c.deid} | {c.description} |"
        )
    return "\n".join(rows) + "\n"


def render_docs() -> str:
    """The whole of ``docs/schema.md``."""
    return (
        "# Schema\n\n"
        "Every frame, chunk and snapshot has these columns, in this order, with these dtypes "
        '(shown for `dtype_backend="numpy_nullable"`; `"pyarrow"` gives `pd.ArrowDtype` of the same '
        "Arrow types). DICOM columns are named by their standard keyword, so frames join with "
        "pydicom and idc-index. Columns marked with an API filter can be pushed down to "
        "SearchImageSets; every other condition runs on the client, exactly.\n\n"
        f"Schema version: {SCHEMA_VERSION}. Generated from `healthimaging_df/schema.py` "
        "(`schema.render_docs()`); a test keeps this file in step.\n\n"
        + markdown_table()
        + "\nPHI columns (never logged, hashed or dropped by redaction policies): "
        + ", ".join(f"`{c}`" for c in PHI_COLUMNS)
        + ".\n"
    )
