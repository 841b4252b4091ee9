"""Deterministic, realistic image-set summaries for the local service, plus JSON Lines I/O.

Real datastores are messy: tags go missing, DICOM dates are partial, names are not ASCII,
import jobs create many image sets in the same second, and non-primary copies share a
series with their primary. The generator reproduces that mess so code tested against the
local service has met it before it meets production.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHIVE_AFTER",
    "NON_PRIMARY",
    "UID_ROOT",
    "dump_jsonl",
    "generate_image_sets",
    "load_jsonl",
]

UID_ROOT = "1.2.826.0.1.3680043.8.498."
_UTC = timezone.utc
_START = datetime(2023, 1, 1, tzinfo=_UTC)
_SPAN_US = int((datetime(2026, 1, 1, tzinfo=_UTC) - _START).total_seconds() * 1_000_000) - 1
_REFERENCE_NOW = datetime(2026, 1, 1, tzinfo=_UTC)
ARCHIVE_AFTER = timedelta(days=30)

_FAMILY = [
    "Smith", "Müller", "O'Brien", "García", "Nguyen", "王", "李", "Kowalski", "Johansson",
    "Dubois", "Rossi", "Papadopoulos", "Yılmaz", "Søndergaard", "Ivanov", "佐藤", "Okafor",
    "Hernández", "Brown", "Nováková",
]  # fmt: skip
_GIVEN = [
    "Jürgen", "Seán", "小明", "María", "Anh", "Anna", "Zoë", "José", "Björn", "Chloé",
    "Wei", "Ola", "Łukasz", "Mary", "John", "Ayşe", "花子", "Chidi", "Renée", "Nikolai",
]  # fmt: skip
_BODY_PARTS = {
    "CT": ["CHEST", "ABDOMEN", "HEAD", "PELVIS", "NECK"],
    "MR": ["BRAIN", "KNEE", "LSPINE", "HEAD", "SHOULDER"],
    "CR": ["CHEST", "HAND", "SKULL"],
    "DX": ["CHEST", "FOOT", "KNEE", "WRIST"],
    "US": ["ABDOMEN", "BREAST", "HEART", "THYROID"],
    "PT": ["WHOLEBODY"],
    "NM": ["HEART", "WHOLEBODY", "THYROID"],
    "MG": ["BREAST"],
    "SR": [],
}
_STUDY_MODALITIES = ["CT", "CT", "CT", "MR", "MR", "CR", "DX", "US", "PT", "NM", "MG"]
_COMPANIONS = {"PT": "CT", "NM": "CT", "CT": "SR", "MG": "SR"}
_DESCRIPTIONS = {
    "CT": "CT {part} W/O CONTRAST",
    "MR": "MRI {part} WITH AND WITHOUT",
    "CR": "XR {part} 2 VIEWS",
    "DX": "XR {part}",
    "US": "US {part} COMPLETE",
    "PT": "PET/CT {part} FDG",
    "NM": "NM {part} SCAN",
    "MG": "MAMMO SCREENING BILATERAL",
}


def _uid(rng: random.Random) -> str:
    return UID_ROOT + str(rng.randrange(10**20, 10**30))


def _patient_id(rng: random.Random, index: int) -> str:
    style = rng.random()
    if style < 0.5:
        return f"PAT{index:06d}"
    if style < 0.7:
        return f"SUBJECT{index:05d}"
    if style < 0.85:
        return f"MRN-{rng.randrange(10**6, 10**7)}"
    if style < 0.95:
        return str(rng.randrange(10**7, 10**8))
    return f"p_{index:04d}"


def _study_time(rng: random.Random) -> str | None:
    hh, mm, ss = rng.randrange(7, 20), rng.randrange(60), rng.randrange(60)
    hhmmss = f"{hh:02d}{mm:02d}{ss:02d}"
    form = rng.random()
    if form < 0.5:
        return hhmmss
    if form < 0.75:
        return f"{hhmmss}.{rng.randrange(10**6):06d}"  # with microseconds
    if form < 0.87:
        return hhmmss[:4] if form < 0.83 else hhmmss[:2]  # HHMM or HH alone
    return None if form < 0.95 else ""


def _study_date(rng: random.Random, created: datetime) -> str | None:
    performed = created - timedelta(days=rng.randrange(0, 365 * 12))
    form = rng.random()
    if form < 0.9:
        return performed.strftime("%Y%m%d")
    if form < 0.93:
        return performed.strftime("%Y")
    if form < 0.96:
        return performed.strftime("%Y%m")
    if form < 0.98:
        return ""
    return None


def _put(tags: dict[str, Any], key: str, value: Any, rng: random.Random, missing: float) -> None:
    """Set ``tags[key]`` unless the draw says this tag is absent (key missing)."""
    if value is not None and rng.random() >= missing:
        tags[key] = value


NON_PRIMARY = 0.05  # default share of series that also get a non-primary (conflicting) copy


def generate_image_sets(
    n: int, seed: int = 0, non_primary: float = NON_PRIMARY
) -> list[dict[str, Any]]:
    """Generate ``n`` image-set summaries in the SearchImageSets response shape.

    Parameters
    ----------
    n
        Number of image sets (exactly ``n`` are returned).
    seed
        Seed; the same ``(n, seed, non_primary)`` always gives the same records.
    non_primary
        Chance (0..1) that a series also gets a non-primary copy (an import that conflicted);
        about that share of the image sets is then non-primary. The default, 5%, is a messy
        datastore; real ones get non-primary image sets from conflicting imports only.

    Returns
    -------
    list of dict
        Summaries with ``imageSetId``, ``version``, ``createdAt``/``updatedAt``/
        ``lastAccessedAt`` (UTC datetimes), ``storageTier``, ``isPrimary`` and ``DICOMTags``.
        ``storageTier`` follows the 30-day rule as of 2026-01-01 (the data's "now"):
        ARCHIVE_INSTANT_ACCESS when ``lastAccessedAt`` is more than 30 days before it.

    Examples
    --------
    >>> records = generate_image_sets(20, seed=1)
    >>> len(records), records == generate_image_sets(20, seed=1)
    (20, True)
    >>> sorted(records[0])[:3]
    ['DICOMTags', 'createdAt', 'imageSetId']
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if not 0.0 <= non_primary <= 1.0:
        raise ValueError("non_primary must be between 0 and 1")
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    patient_index = 0

    def new_id() -> str:
        while True:
            candidate = f"{rng.getrandbits(128):032x}"
            if candidate not in seen_ids:
                seen_ids.add(candidate)
                return candidate

    while len(records) < n:
        patient_index += 1
        patient: dict[str, Any] = {}
        _put(patient, "DICOMPatientId", _patient_id(rng, patient_index), rng, 0.005)
        name = f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}"
        if rng.random() < 0.05:
            name += "^" + rng.choice(_GIVEN)
        _put(patient, "DICOMPatientName", "" if rng.random() < 0.02 else name, rng, 0.02)
        birth = datetime(1930, 1, 1) + timedelta(days=rng.randrange(0, 365 * 90))
        birth_text = birth.strftime("%Y%m%d") if rng.random() < 0.95 else birth.strftime("%Y")
        _put(patient, "DICOMPatientBirthDate", birth_text, rng, 0.04)
        _put(patient, "DICOMPatientSex", rng.choice("MMFFFO"), rng, 0.05)

        for _study in range(rng.randint(1, 4)):
            if len(records) >= n:
                break
            modality = rng.choice(_STUDY_MODALITIES)
            part = rng.choice(_BODY_PARTS[modality])
            imported = _START + timedelta(microseconds=rng.randrange(_SPAN_US))
            study: dict[str, Any] = dict(patient)
            study["DICOMStudyInstanceUID"] = _uid(rng)
            _put(study, "DICOMStudyId", str(rng.randrange(1, 99999)), rng, 0.1)
            _put(
                study, "DICOMStudyDescription", _DESCRIPTIONS[modality].format(part=part), rng, 0.05
            )
            _put(study, "DICOMAccessionNumber", f"A{rng.randrange(10**7, 10**8)}", rng, 0.05)
            _put(study, "DICOMStudyDate", _study_date(rng, imported), rng, 0.0)
            _put(study, "DICOMStudyTime", _study_time(rng), rng, 0.0)
            series_count = rng.randint(1, 6)
            study["DICOMNumberOfStudyRelatedSeries"] = series_count
            instances = [rng.randint(1, 400) for _ in range(series_count)]
            study["DICOMNumberOfStudyRelatedInstances"] = sum(instances)
            offset_us = 0
            for number in range(1, series_count + 1):
                if len(records) >= n:
                    break
                series_modality = modality
                if number > 1 and modality in _COMPANIONS and rng.random() < 0.3:
                    series_modality = _COMPANIONS[modality]
                tags = dict(study)
                tags["DICOMSeriesInstanceUID"] = _uid(rng)
                tags["DICOMSeriesModality"] = series_modality
                parts = _BODY_PARTS[series_modality]
                _put(tags, "DICOMSeriesBodyPart", part if part in parts else None, rng, 0.1)
                _put(tags, "DICOMSeriesNumber", number, rng, 0.02)
                # One import job: series land within a second or two, some in the same microsecond.
                if rng.random() >= 0.05:
                    offset_us += rng.randrange(0, 700_000)
                records.append(_summary(rng, new_id(), imported, offset_us, tags, True))
                if rng.random() < non_primary and len(records) < n:
                    copy_offset = offset_us + rng.randrange(1, 86_400_000_000)
                    records.append(_summary(rng, new_id(), imported, copy_offset, tags, False))
    return records


def _summary(
    rng: random.Random,
    image_set_id: str,
    imported: datetime,
    offset_us: int,
    tags: dict[str, Any],
    is_primary: bool,
) -> dict[str, Any]:
    created = imported + timedelta(microseconds=offset_us)
    draw = rng.random()
    version = 1 if draw < 0.85 else (2 if draw < 0.95 else rng.randint(3, 5))
    updated = created
    if version > 1:
        updated = created + timedelta(microseconds=rng.randrange(1, 200 * 86_400_000_000))
    accessed = updated + timedelta(microseconds=rng.randrange(0, 90 * 86_400_000_000))
    # The service's rule: 30 days without an access moves an image set to the archive tier.
    # Of those idle that long, 40% were read again within the last 30 days (same draw as
    # before the rule was exact, so tiers and every other field keep their values).
    tier = "FREQUENT_ACCESS"
    if _REFERENCE_NOW - accessed > ARCHIVE_AFTER:
        draw = rng.random()
        if draw < 0.6:
            tier = "ARCHIVE_INSTANT_ACCESS"
        else:
            accessed = _REFERENCE_NOW - ARCHIVE_AFTER * ((draw - 0.6) / 0.4)
    return {
        "imageSetId": image_set_id,
        "version": version,
        "createdAt": created,
        "updatedAt": updated,
        "lastAccessedAt": accessed,
        "storageTier": tier,
        "isPrimary": is_primary,
        "DICOMTags": dict(tags),
    }


_TIME_KEYS = ("createdAt", "updatedAt", "lastAccessedAt")


def dump_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write summaries as JSON Lines (timestamps as ISO-8601 UTC); return the count written."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as out:
        for record in records:
            row = dict(record)
            for key in _TIME_KEYS:
                if isinstance(row.get(key), datetime):
                    row[key] = row[key].astimezone(_UTC).isoformat()
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read summaries written by :func:`dump_jsonl` (or by hand) back into API-shaped dicts."""
    records: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as source:
        for line_number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not JSON ({exc.msg})") from None
            for key in _TIME_KEYS:
                value = row.get(key)
                if isinstance(value, str):
                    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
                    if parsed.tzinfo is None:
                        parsed = parsed.replace(tzinfo=_UTC)
                    row[key] = parsed.astimezone(_UTC)
            records.append(row)
    return records
