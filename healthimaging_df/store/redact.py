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

Keys resist guessing: at least 32 bytes (:func:`generate_key` makes one), and nothing stored
confirms a guess cheaply. The key is never written anywhere; :meth:`RedactionPolicy.fingerprints`
gives a record a redacted snapshot can keep to check, at refresh, that the same key and the same
query are used: a salted scrypt of the key (about 16 MiB and tens of milliseconds per guess)
keys an HMAC of the query JSON, so neither the key nor the query's values can be read back or
cheaply confirmed from it. The column name is part of every pseudonym's HMAC, so equal values
in different columns (a PatientID that is also an AccessionNumber) get different pseudonyms.

>>> policy = RedactionPolicy(key=generate_key())
>>> policy.hash_value("PatientID", "P1") == policy.hash_value("PatientID", "P1")
True
>>> policy.hash_value("PatientID", "P1") == policy.hash_value("AccessionNumber", "P1")
False
>>> policy.hash_value("StudyInstanceUID", "1.2.3").startswith("2.25.")
True
>>> "key_fingerprint" in policy.describe()
False
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from healthimaging_df import schema
from healthimaging_df.core import checks
from healthimaging_df.errors import QueryValidationError, SnapshotError

MIN_KEY_BYTES = 32
MIN_DISTINCT_KEY_BYTES = 8
# The defaults come from each column's de-identification role in the schema.
DEFAULT_DROP: tuple[str, ...] = schema.deid_columns("drop")
DEFAULT_HASH: tuple[str, ...] = schema.deid_columns("hash")
SHIFTED_COLUMNS: tuple[str, ...] = schema.deid_columns("shift")
_HASH_DOMAIN = b"healthimaging_df/id/v2\x00"
_SHIFT_DOMAIN = b"healthimaging_df/date-shift\x00"
_CHECK_DOMAIN = b"healthimaging_df/key-check\x00"
_QUERY_DOMAIN = b"healthimaging_df/query\x00"
# scrypt's interactive parameters: 16 MiB and tens of milliseconds per guess
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
# The largest date shift: 100 years. Every study date from 1778 to 2162 then stays a valid pandas
# timestamp (1677-09-21..2262-04-11, nanoseconds) and a four-digit DICOM year; a shift of millions
# of days wrote years -5630..10070, or overflowed pandas only after the whole fetch.
MAX_SHIFT_DAYS = 36_500
_SCRYPT_MAXMEM = 256 * 1024 * 1024


def generate_key(nbytes: int = 32) -> str:
    """A new random redaction key: *nbytes* (at least 32) from ``secrets``, as URL-safe text.

    Store it in a secrets manager; ``RedactionPolicy(key=generate_key())`` uses it as UTF-8.
    """
    checks.integer("nbytes", nbytes, minimum=MIN_KEY_BYTES)
    return secrets.token_urlsafe(nbytes)


@dataclass(frozen=True)
class RedactionPolicy:
    """What to remove or pseudonymize before a frame leaves the secure environment.

    Parameters
    ----------
    key
        Secret key for the HMACs: at least 32 bytes with at least 8 different byte values (a
        ``str`` is UTF-8 encoded); :func:`generate_key` makes one. Keep it in a secrets manager:
        with it, pseudonyms can be recomputed from known identifiers.
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
        Largest shift, in days: 1 to ``MAX_SHIFT_DAYS`` (36,500, 100 years), so every study date
        from 1778 to 2162 stays a valid pandas timestamp.
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
            raise QueryValidationError(
                "key", f"must be at least {MIN_KEY_BYTES} bytes (generate one with generate_key())"
            )
        if len(set(key)) < MIN_DISTINCT_KEY_BYTES:
            raise QueryValidationError(
                "key", "repeats too few byte values to resist guessing; use generate_key()"
            )
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
        checks.positive_int("max_shift_days", days)
        if days > MAX_SHIFT_DAYS:
            raise QueryValidationError(
                "max_shift_days",
                f"must be at most {MAX_SHIFT_DAYS} (100 years; MAX_SHIFT_DAYS), so every shifted "
                "study date stays a valid pandas timestamp",
            )

    # -- primitives ------------------------------------------------------------------------------

    def hash_value(self, column: str, value: str) -> str:
        """The pseudonym of *value* in *column* (the same for every export made with this key).

        The column name is hashed too: equal values in two columns get unrelated pseudonyms.
        """
        if column not in schema.BY_NAME:
            raise QueryValidationError("column", f"unknown column {column!r}")
        if not isinstance(value, str):
            raise QueryValidationError("value", "must be a string")
        message = _HASH_DOMAIN + column.encode("utf-8") + b"\x00" + value.encode("utf-8")
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
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

    def describe(self) -> dict[str, Any]:
        """The policy as JSON-ready data, with nothing derived from the key (for provenance)."""
        return {
            "drop": list(self.drop),
            "hash": list(self.hash),
            "hash_function": "HMAC-SHA256(key, column + value)",
            "birth_date_to_year": self.birth_date_to_year,
            "shift_dates": list(SHIFTED_COLUMNS) if self.shift_dates else [],
            "max_shift_days": self.max_shift_days,
        }

    def key_fingerprint(self) -> str:
        """Removed: a stored fast fingerprint confirmed a guessed key in one HMAC.

        Always raises ``SnapshotError``, so code still relying on it fails closed (never checks
        nothing); use :meth:`fingerprints` and :meth:`check_fingerprints`.
        """
        raise SnapshotError(
            "key fingerprints were removed (they confirmed guessed keys cheaply); check a "
            "redacted snapshot's key with RedactionPolicy.check_fingerprints"
        )

    # -- checks a redacted snapshot can store -------------------------------------------------

    def fingerprints(self, query_json: str | None, *, salt: bytes | None = None) -> dict[str, Any]:
        """A record that later proves "same key, same query" without revealing either.

        ``scrypt(key, salt)`` (random 16-byte salt) keys two HMACs: one of a constant (the key
        check) and one of the canonical query JSON (the query fingerprint). Checking a guessed
        key costs one scrypt; the record holds no query value. Store it in the provenance of a
        redacted snapshot and pass it to :meth:`check_fingerprints` before a refresh.

        Parameters
        ----------
        query_json
            ``json.dumps(query.to_dict())`` of the unredacted query (None: no query check).
        salt
            For tests; a new random salt when None.
        """
        salt = secrets.token_bytes(16) if salt is None else salt
        if not isinstance(salt, bytes) or len(salt) < 16:
            raise QueryValidationError("salt", "must be at least 16 bytes")
        derived = self._derive(salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        return {
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": base64.b64encode(salt).decode("ascii"),
            "key_check": hmac.new(derived, _CHECK_DOMAIN, hashlib.sha256).hexdigest(),
            "query": None if query_json is None else _query_mac(derived, query_json),
        }

    def check_fingerprints(self, recorded: Mapping[str, Any], query_json: str | None) -> None:
        """Raise ``SnapshotError`` unless *recorded* was made with this key and this query.

        Parameters
        ----------
        recorded
            What :meth:`fingerprints` returned when the snapshot was written.
        query_json
            The query the caller means (unredacted JSON); None skips the query check.
        """
        try:
            if recorded.get("kdf") != "scrypt":
                raise ValueError
            n, r, p = int(recorded["n"]), int(recorded["r"]), int(recorded["p"])
            if not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):
                raise ValueError
            salt = base64.b64decode(str(recorded["salt"]), validate=True)
            key_check = str(recorded["key_check"])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise SnapshotError("the snapshot's redaction fingerprints are damaged") from None
        derived = self._derive(salt, n, r, p)
        expected = hmac.new(derived, _CHECK_DOMAIN, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, key_check):
            raise SnapshotError("redact= uses a different key than the snapshot was made with")
        if query_json is not None:
            stored = recorded.get("query")
            if not isinstance(stored, str) or not hmac.compare_digest(
                _query_mac(derived, query_json), stored
            ):
                raise SnapshotError(
                    "query= is not the query the snapshot was made with; refusing to mix cohorts "
                    "(export the other query to a new path)"
                )

    def _derive(self, salt: bytes, n: int, r: int, p: int) -> bytes:
        return hashlib.scrypt(self.key, salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)


def apply_redaction(df: pd.DataFrame, policy: RedactionPolicy) -> pd.DataFrame:
    """Return a redacted copy of *df* (columns it lacks are skipped); dtypes are kept.

    >>> frame = pd.DataFrame({"PatientID": pd.array(["P1", None], dtype="string"),
    ...                       "PatientBirthDate": pd.array(["19700131", "1980"], dtype="string")})
    >>> out = apply_redaction(frame, RedactionPolicy(key=generate_key()))
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


def _query_mac(derived: bytes, query_json: str) -> str:
    """HMAC of the query in canonical form (key order and spacing do not matter)."""
    if not isinstance(query_json, str):
        raise QueryValidationError("query_json", "must be a JSON string")
    try:
        canonical = json.dumps(json.loads(query_json), sort_keys=True, separators=(",", ":"))
    except ValueError:
        raise QueryValidationError("query_json", "must be valid JSON") from None
    return hmac.new(derived, _QUERY_DOMAIN + canonical.encode("utf-8"), hashlib.sha256).hexdigest()


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
