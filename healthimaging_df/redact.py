"""Redaction policies for snapshots that leave the secure environment.

A snapshot holds PHI by default (patient IDs, names, birth dates, UIDs). A :class:`RedactionPolicy`
turns a frame into a pseudonymized one before it is written:

- ``drop``: columns removed outright (``PatientName`` by default);
- ``hash``: identifiers replaced by a keyed HMAC-SHA256 of their value, so the same key gives the same
  pseudonym in every export (joins across exports still work) while nobody without the key can
  reverse or recompute it; UID columns get a valid DICOM UID (``2.25.<integer>``);
- ``birth_date_to_year``: ``PatientBirthDate`` cut to its year;
- ``shift_dates``: ``StudyDate`` and ``StudyDateTime`` moved by a whole number of days that depends on
  the key and the patient, so intervals between one patient's studies are kept.

The key itself is never written anywhere: provenance records the policy with a key fingerprint only.

>>> policy = RedactionPolicy(key=b"0123456789abcdef-demo-key")
>>> policy.hash_value("PatientID", "P1") == policy.hash_value("PatientID", "P1")
True
>>> policy.hash_value("StudyInstanceUID", "1.2.3").startswith("2.25.")
True
>>> "key" in policy.describe()
False
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from healthimaging_df import schema
from healthimaging_df.errors import QueryValidationError, SnapshotError

MIN_KEY_BYTES = 16
# The defaults come from each column's de-identification role in the schema.
DEFAULT_DROP: tuple[str, ...] = schema.deid_columns("drop")
DEFAULT_HASH: tuple[str, ...] = schema.deid_columns("hash")
SHIFTED_COLUMNS: tuple[str, ...] = schema.deid_columns("shift")
_HASH_DOMAIN = b"healthimaging_df/id\x00"
_SHIFT_DOMAIN = b"healthimaging_df/date-shift\x00"
_FINGERPRINT_DOMAIN = b"healthimaging_df/key-fingerprint"


@dataclass(frozen=True)
class RedactionPolicy:
    """What to remove or pseudonymize before a frame leaves the secure environment.

    Parameters
    ----------
    key
        Secret key for the HMACs (at least 16 bytes; a ``str`` is UTF-8 encoded). Keep it in a
        secrets manager: with it, pseudonyms can be recomputed from known identifiers.
    drop
        Columns removed from the frame.
    hash
        String columns replaced by their keyed hash (32 hex characters; ``2.25.<int>`` for UIDs).
    birth_date_to_year
        Keep only the year of ``PatientBirthDate`` (values without a leading year become null).
    shift_dates
        Shift ``StudyDate`` and ``StudyDateTime`` by a per-patient keyed offset of 1 to
        ``max_shift_days`` days, earlier or later; unparseable ``StudyDate`` values become null.
    max_shift_days
        Largest shift, in days.
    """

    key: bytes = field(repr=False)
    drop: tuple[str, ...] = DEFAULT_DROP
    hash: tuple[str, ...] = DEFAULT_HASH
    birth_date_to_year: bool = True
    shift_dates: bool = True
    max_shift_days: int = 365

    def __post_init__(self) -> None:
        # every fault is a QueryValidationError (a ValueError) naming the argument, never the key
        key: object = self.key
        if isinstance(key, str):
            key = key.encode("utf-8")
        elif isinstance(key, (bytearray, memoryview)):
            key = bytes(key)
        if not isinstance(key, bytes):
            raise QueryValidationError("key", "must be bytes or str")
        if len(key) < MIN_KEY_BYTES:
            raise QueryValidationError("key", f"must be at least {MIN_KEY_BYTES} bytes")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "drop", _column_names("drop", self.drop))
        object.__setattr__(self, "hash", _column_names("hash", self.hash))
        for argument in ("drop", "hash"):
            for position, name in enumerate(getattr(self, argument)):
                if name not in schema.BY_NAME:
                    raise QueryValidationError(argument, f"unknown column {name!r}", position)
        for position, name in enumerate(self.hash):
            if schema.BY_NAME[name].kind != "string":
                raise QueryValidationError(
                    "hash", f"only text columns can be hashed, not {name!r}", position
                )
        overlap = set(self.drop) & set(self.hash)
        if overlap:
            raise QueryValidationError(
                "hash", f"columns both dropped and hashed: {', '.join(sorted(overlap))}"
            )
        for flag in ("birth_date_to_year", "shift_dates"):
            if not isinstance(getattr(self, flag), bool):
                raise QueryValidationError(flag, "must be True or False")
        days = self.max_shift_days
        if isinstance(days, bool) or not isinstance(days, int) or days < 1:
            raise QueryValidationError("max_shift_days", "must be a positive integer")

    # -- primitives ------------------------------------------------------------------------------

    def hash_value(self, column: str, value: str) -> str:
        """The pseudonym of *value* in *column* (the same for every export made with this key)."""
        if column not in schema.BY_NAME:
            raise QueryValidationError("column", f"unknown column {column!r}")
        if not isinstance(value, str):
            raise QueryValidationError("value", "must be a string")
        digest = hmac.new(self.key, _HASH_DOMAIN + value.encode("utf-8"), hashlib.sha256).digest()
        if schema.BY_NAME[column].uid:
            return "2.25." + str(int.from_bytes(digest[:16], "big"))
        return digest[:16].hex()

    def date_offset_days(self, patient_id: str | None) -> int:
        """Days (non-zero) by which a patient's study dates move; a missing ID counts as ``""``."""
        if patient_id is not None and not isinstance(patient_id, str):
            raise QueryValidationError("patient_id", "must be a string or None")
        text = "" if patient_id is None else patient_id
        digest = hmac.new(self.key, _SHIFT_DOMAIN + text.encode("utf-8"), hashlib.sha256).digest()
        number = int.from_bytes(digest[:8], "big")
        days = 1 + (number >> 1) % self.max_shift_days
        return -days if number & 1 else days

    def key_fingerprint(self) -> str:
        """A short fingerprint of the key: tells whether two exports used the same key."""
        return hmac.new(self.key, _FINGERPRINT_DOMAIN, hashlib.sha256).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The policy as JSON-ready data, without the key (recorded in snapshot provenance)."""
        return {
            "drop": list(self.drop),
            "hash": list(self.hash),
            "hash_function": "HMAC-SHA256",
            "birth_date_to_year": self.birth_date_to_year,
            "shift_dates": list(SHIFTED_COLUMNS) if self.shift_dates else [],
            "max_shift_days": self.max_shift_days,
            "key_fingerprint": self.key_fingerprint(),
        }


def apply_redaction(df: pd.DataFrame, policy: RedactionPolicy) -> pd.DataFrame:
    """Return a redacted copy of *df* (columns it lacks are skipped); dtypes are kept.

    >>> frame = pd.DataFrame({"PatientID": pd.array(["P1", None], dtype="string"),
    ...                       "PatientBirthDate": pd.array(["19700131", "1980"], dtype="string")})
    >>> out = apply_redaction(frame, RedactionPolicy(key="a key of sixteen+ bytes"))
    >>> out["PatientBirthDate"].tolist(), out["PatientID"].isna().tolist()
    (['1970', '1980'], [False, True])
    """
    if not isinstance(df, pd.DataFrame):
        raise QueryValidationError("df", "must be a pandas DataFrame")
    if not isinstance(policy, RedactionPolicy):
        raise QueryValidationError("policy", "must be a RedactionPolicy")
    out: pd.DataFrame = df.drop(columns=[c for c in policy.drop if c in df.columns])
    if policy.shift_dates:
        out = _shift_dates(out, df, policy)
    for name in policy.hash:
        if name in out.columns:
            column = out[name]
            uniques = column.dropna().unique()
            mapping = {value: policy.hash_value(name, str(value)) for value in uniques}
            out[name] = column.map(mapping).astype(column.dtype)
    if policy.birth_date_to_year and "PatientBirthDate" in out.columns:
        column = out["PatientBirthDate"]
        text = column.astype(pd.StringDtype("pyarrow"))
        year = text.str.slice(0, 4).where(text.str.match(r"^[0-9]{4}").fillna(False))
        out["PatientBirthDate"] = year.astype(column.dtype)
    return out


def _shift_dates(
    out: pd.DataFrame, original: pd.DataFrame, policy: RedactionPolicy
) -> pd.DataFrame:
    """Move StudyDate / StudyDateTime by each row's patient offset (read from the original IDs)."""
    targets = [c for c in SHIFTED_COLUMNS if c in out.columns]
    if not targets:
        return out
    if "PatientID" in original.columns:
        ids = original["PatientID"].astype(object).where(original["PatientID"].notna(), None)
        offsets_by_id = {value: policy.date_offset_days(value) for value in set(ids.tolist())}
        days = ids.map(offsets_by_id).astype("int64")
    else:
        days = pd.Series(policy.date_offset_days(None), index=original.index, dtype="int64")
    shift = pd.to_timedelta(days.to_numpy(), unit="D")
    if "StudyDate" in targets:
        column = out["StudyDate"]
        text = column.astype(pd.StringDtype("pyarrow"))
        parsed = pd.to_datetime(text, format="%Y%m%d", errors="coerce")
        moved = (parsed + shift).dt.strftime("%Y%m%d")
        out["StudyDate"] = moved.astype(pd.StringDtype("pyarrow")).astype(column.dtype)
    if "StudyDateTime" in targets:
        column = out["StudyDateTime"]
        as_datetime = column.astype("datetime64[us]")
        moved_times = (as_datetime + shift).astype("datetime64[us]")
        out["StudyDateTime"] = moved_times.astype(column.dtype)
    return out


def redact_query_json(query_json: str | None) -> str | None:
    """Replace every value in a ``Query.to_dict()`` JSON string by a count (values are PHI).

    Raises ``SnapshotError`` (without quoting the text) when it is not such a string: what cannot
    be parsed cannot be redacted, and is not passed on either.
    """
    import json

    if query_json is None:
        return None
    try:
        data = json.loads(query_json)
        if not isinstance(data, dict):
            raise TypeError
        data["predicates"] = [
            {
                "column": str(p["column"]),
                "op": str(p["op"]),
                "values_redacted": len(p.get("values", ())),
            }
            for p in data.get("predicates", ())
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise SnapshotError(
            "the provenance 'query' is not Query.to_dict() JSON, so it cannot be redacted; "
            "pass provenance= without it"
        ) from None
    data["redacted"] = True
    return json.dumps(data, sort_keys=True)


def _column_names(argument: str, names: Any) -> tuple[str, ...]:
    if isinstance(names, str):
        raise QueryValidationError(argument, "must be a list of column names, not one string")
    try:
        out = tuple(names)
    except TypeError:
        raise QueryValidationError(argument, "must be a list of column names") from None
    for position, name in enumerate(out):
        if not isinstance(name, str):
            raise QueryValidationError(argument, "column names must be strings", position)
    return out
