r"""QIDO-RS as an access path, pure: which conditions it may match, and the step a plan carries.

A condition goes to QIDO-RS only where the answer is a superset of the exact match under what
AWS documents (the client re-checks every row):

- **Levels.** A QIDO-RS series record is one series, and a primary image set holds one series:
  series-level keys (``Modality``, ``SeriesNumber``) are matched per image set, soundly. Study-
  and patient-level keys (``PatientName``, ``StudyDescription``, ``PatientBirthDate``,
  ``StudyDate``) are matched against one value per study, and AWS does not say that a study's
  primary image sets agree on them (an ``UpdateImageSetMetadata`` without
  ``includeStudyImageSets`` changes one image set): an image set holding the value asked for, in
  a study reported with another value, would be missed. They go to QIDO-RS only when the caller
  asserts the agreement (``assume_consistent_studies=True``; ``explain()`` says so).
- **Matching** (PS3.4 C.2.2.2): single-value matching is exact and case-sensitive, except PN,
  which a server may match case-insensitively: either way a superset of the client's ``==``;
  ``*`` and ``?`` match any characters, so a value holding them matches a superset of itself;
  ``\\`` (value multiplicity) and control characters are never sent; ``contains(s)`` becomes
  ``*s*``, ``matches`` only for a plain literal (``^lit``, ``lit`` or ``lit$``), ignoring case
  only when ``s`` has no cased letter (wildcard matching of non-PN values is case-sensitive);
  dates (DA) only as whole 8-digit dates (a raw-string range on the client also admits partial
  dates that a DA range never matches); PN values holding ``=`` (other name groups) are not
  sent; ``fuzzymatching`` is never used (its word splitting is undocumented).
- **Scope.** QIDO-RS sees primary image sets only: unless the query keeps ``isPrimary=True``,
  the non-primary image sets are swept with SearchImageSets (:class:`Sweep`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from healthimaging_df.plan.conditions import ranges
from healthimaging_df.plan.limits import QIDO_MAX_SEARCHES, QIDO_RECORDS
from healthimaging_df.plan.predicates import Predicate

if TYPE_CHECKING:
    from healthimaging_df.plan.model import Chain, Plan

QIDO_SERIES_COLUMNS = ("Modality", "SeriesNumber")
QIDO_STUDY_COLUMNS = ("PatientName", "StudyDescription", "PatientBirthDate", "StudyDate")
QIDO_COLUMNS = (*QIDO_SERIES_COLUMNS, *QIDO_STUDY_COLUMNS)
LEVEL_OF = {
    "Modality": "series",
    "SeriesNumber": "series",
    "PatientName": "patient",
    "PatientBirthDate": "patient",
    "StudyDescription": "study",
    "StudyDate": "study",
}
CONSISTENT_OPTION = "assume_consistent_studies"
_DA_COLUMNS = ("PatientBirthDate", "StudyDate")
_REGEX_META = set(".^$*+?{}[]\\|()")
# Narrowest first: the tie-break when two keys of an answer give as many chains.
RESOLVE_ORDER = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID")
RESOLVE_TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "PatientID": "00100020",
}


@dataclass(frozen=True)
class QidoSearch:
    """One QIDO-RS search: a level and its match keys (DICOM keyword to QIDO text)."""

    level: Literal["studies", "series"]
    match: tuple[tuple[str, str], ...]

    def __repr__(self) -> str:
        return f"QidoSearch({self.level}, keys={[k for k, _ in self.match]})"  # no values: PHI

    def describe(self, show_values: bool = False) -> str:
        """``GET /series?Modality=...`` with values hidden unless *show_values*."""
        keys = "&".join(f"{k}={v if show_values else '<value>'}" for k, v in self.match)
        return f"GET /{self.level}?{keys}"

    @property
    def fields(self) -> list[str]:
        """The attributes each record must carry: what the answer is resolved by."""
        found = ["PatientID", "StudyInstanceUID"]
        return [*found, "SeriesInstanceUID"] if self.level == "series" else found


@dataclass(frozen=True)
class Sweep:
    """The SearchImageSets chains that read the non-primary image sets QIDO-RS cannot see.

    A non-primary copy (a conflict) may differ from its primary in exactly the attribute
    matched, or have no primary left: only ``isPrimary=false`` finds them all, and nothing
    narrows it soundly. Sized from the statistics or by its first page; a small one is one chain.
    """

    chains: tuple[Chain, ...] = field(default=(), repr=False)
    requests: float = 0.0  # estimated (0 when nothing is swept)
    image_sets: int | None = None  # non-primary image sets it reads, when measured
    exact: bool = False
    swept: bool = True  # False: the query keeps primary image sets only

    @property
    def label(self) -> str:
        """Its size for notes and ``explain()``: counts only, no values."""
        if not self.swept:
            return "none: primary image sets only"
        count = (
            "size unknown"
            if self.image_sets is None
            else f"{self.image_sets:,} image set(s)"
            if self.exact
            else f"about {self.image_sets:,} image set(s)"
        )
        shape = (
            "one chain"
            if len(self.chains) == 1 and self.chains[0].window is None
            else (f"{len(self.chains)} chain(s)" if self.chains else "no chain")
        )
        return f"{count}, {shape}, about {self.requests:,.0f} request(s)"


@dataclass(frozen=True)
class QidoStep:
    """QIDO-RS searches whose union holds (a superset of) the primary image sets that match.

    Run at run time by the engine; the answer's studies, series or patients (whichever give
    the fewest chains) become an IN list the SearchImageSets plan fans out on, plus the sweep
    (``plan.resolve``). The plan carrying the step holds, as its chains, the SearchImageSets
    plan that runs when QIDO-RS is unavailable, over budget or truncated.
    """

    searches: tuple[QidoSearch, ...]
    pushed: tuple[Predicate, ...]
    date_range: tuple[str, str] | None = None  # StudyDate bounds (YYYYMMDD), for splitting
    forced: bool = False  # strategy "qido": never abandoned for cost; a failure raises
    consistent: bool = False  # study/patient-level keys matched per study, on the caller's word
    budget: int | None = None  # records read before the plan it replaces is cheaper
    replaced: float | None = None  # requests of the plan it replaces, when known
    sweep: Sweep = field(default_factory=Sweep)

    @property
    def level(self) -> Literal["studies", "series"]:
        """``series`` when a series key is matched, else ``studies``."""
        return self.searches[0].level

    def explain_lines(self, show_values: bool) -> list[str]:
        """Lines of ``Plan.explain()``."""
        budget = (
            "no budget (forced)"
            if self.budget is None
            else f"abandoned past {self.budget:,} records (the plan below is cheaper then)"
        )
        lines = [
            "  QIDO-RS step (run first, at run time; primary image sets only):",
            *(f"    {s.describe(show_values)}" for s in self.searches),
            "    matched by QIDO-RS (a superset; re-checked on the client):",
            *(f"      {p.describe(show_values)}" for p in self.pushed),
        ]
        if self.consistent:
            lines.append(
                f"    {CONSISTENT_OPTION}=True in force: study- and patient-level keys are "
                "matched against one value per study, on the caller's word that a study's "
                "image sets agree (AWS does not guarantee it)"
            )
        lines += [
            f"    {QIDO_RECORDS:,} records a request; every page checked (a JSON list of DICOM "
            "objects carrying the UIDs resolved by), a search ends on an empty page; exactly "
            "10,000 records (an older cap) or a full page at the largest offset means 'maybe "
            "more': "
            + ("split by StudyDate, else " if self.date_range else "")
            + "the plan below runs instead",
            f"    {budget}",
            "    then SearchImageSets by StudyInstanceUID, SeriesInstanceUID or PatientID (fewest"
            " chains; non-primary copies of those come too), plus the non-primary sweep ("
            + self.sweep.label
            + "); when those cost as much as the plan below, it runs instead",
            "    if DICOMweb is denied, absent or broken: one warning, and the plan below runs",
        ]
        return lines


@dataclass(frozen=True)
class QidoChoice:
    """The QIDO-RS searches for a query, or why there are none (a line of ``explain()``)."""

    step: QidoStep | None
    why_not: str | None = None


def qido_step(predicates: tuple[Predicate, ...], consistent: bool = False) -> QidoChoice:
    """The QIDO-RS searches for *predicates*, or why no condition can go to QIDO-RS soundly.

    Study- and patient-level keys only with *consistent* (the caller's assertion).
    """
    per_column: dict[str, tuple[Predicate, tuple[str, ...]]] = {}
    held_back: list[str] = []
    for p in predicates:
        if p.column not in QIDO_COLUMNS or p.column in per_column:
            continue
        values = _qido_values(p)
        if not values:
            continue
        if p.column in QIDO_STUDY_COLUMNS and not consistent:
            held_back.append(p.column)
            continue
        per_column[p.column] = (p, values)
    date_range = study_date_range(predicates) if consistent else None
    if not per_column:
        return QidoChoice(None, _why_not(held_back))
    keys, pushed = _keys(per_column)
    if date_range is not None and "StudyDate" not in dict(keys):
        keys.append(("StudyDate", (f"{date_range[0]}-{date_range[1]}",)))
        pushed += [p for p in predicates if p.column == "StudyDateTime" and p.op == "between"]
    level: Literal["studies", "series"] = (
        "series" if any(k in QIDO_SERIES_COLUMNS for k, _ in keys) else "studies"
    )
    combos: list[tuple[tuple[str, str], ...]] = [()]
    for column, values in keys:
        combos = [(*c, (column, v)) for c in combos for v in values]
    found = tuple(QidoSearch(level, tuple(sorted(c))) for c in combos)
    step = QidoStep(found, tuple(pushed), date_range, consistent=consistent)
    return QidoChoice(step, _why_not(held_back) if held_back else None)


def _keys(
    per_column: dict[str, tuple[Predicate, tuple[str, ...]]],
) -> tuple[list[tuple[str, tuple[str, ...]]], list[Predicate]]:
    """The keys to match, most selective first, while their searches stay within the cap.

    One value before several, series keys before study keys; past ``QIDO_MAX_SEARCHES``
    searches, the remaining keys stay on the client only.
    """
    keys: list[tuple[str, tuple[str, ...]]] = []
    pushed: list[Predicate] = []
    searches = 1
    for column in sorted(per_column, key=lambda c: (len(per_column[c][1]), QIDO_COLUMNS.index(c))):
        p, values = per_column[column]
        if keys and searches * len(values) > QIDO_MAX_SEARCHES:
            continue
        searches *= len(values)
        keys.append((column, values))
        pushed.append(p)
    return keys, pushed


def _why_not(held_back: list[str]) -> str | None:
    if not held_back:
        return None
    names = ", ".join(f"{c} ({LEVEL_OF[c]}-level)" for c in held_back)
    return (
        f"not matched by QIDO-RS: {names}; QIDO-RS reports one value per study, and AWS does "
        "not guarantee that a study's image sets agree on it, so an image set holding the value "
        f"asked for could be missed ({CONSISTENT_OPTION}=True matches it there)"
    )


def _qido_values(p: Predicate) -> tuple[str, ...]:
    """QIDO-RS values whose matches are a superset of *p*'s, or () when there are none."""
    if p.op in ("eq", "in"):
        if p.column == "SeriesNumber":
            return tuple(str(v) for v in p.values)
        if p.column in _DA_COLUMNS and not all(_whole_date(v) for v in p.values):
            return ()
        texts = tuple(str(v) for v in p.values)
    elif p.op in ("contains", "regex") and p.column not in _DA_COLUMNS:
        literal = p.values[0] if p.op == "contains" else _regex_literal(p.values[0])
        if literal is None or literal.strip("*") == "":
            return ()
        if not p.case and literal.lower() != literal.upper():
            return ()  # wildcard matching of non-PN values is case-sensitive
        anchored = p.op == "regex" and p.values[0].startswith("^")
        texts = (("" if anchored else "*") + literal + "*",)
    else:
        return ()
    return texts if all(_sendable(p.column, t) for t in texts) else ()


def _sendable(column: str, text: str) -> bool:
    """Whether *text* may be sent as a match value of *column* (see the module's rules)."""
    if "\\" in text or len(text) > 1000 or any(ord(c) < 32 for c in text) or text == "":
        return False
    if column == "PatientName" and "=" in text:
        return False
    return text.strip("*") != ""  # universal matching: nothing gained


def _regex_literal(pattern: str) -> str | None:
    """The literal a plain regex (``^lit``, ``lit``, ``lit$``) searches for, else None."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    out: list[str] = []
    escaped = False
    for c in body:
        if escaped:
            if c.isalnum():
                return None  # \d, \b ... are classes or assertions, not literals
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in _REGEX_META:
            return None
        else:
            out.append(c)
    return None if escaped or not out else "".join(out)


def _whole_date(value: Any) -> bool:
    if not (isinstance(value, str) and len(value) == 8 and value.isascii() and value.isdigit()):
        return False
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return True


def study_date_range(predicates: tuple[Predicate, ...]) -> tuple[str, str] | None:
    """The StudyDate day range every kept row falls in, from ``StudyDateTime`` ranges."""
    found = ranges(predicates)
    if "StudyDateTime" not in found:
        return None
    low, high = found["StudyDateTime"]
    if low > high:
        return None
    return f"{max(low.year, 1):04d}{low:%m%d}", f"{high.year:04d}{high:%m%d}"


def answer_keys(records: list[Any], level: str) -> dict[str, set[str]]:
    """Per resolvable column, the distinct values of an answer.

    A column some record lacks (PatientID is optional) is left out; the UIDs are always there
    (the engine checks each page for the ones its step needs).
    """
    columns = [c for c in RESOLVE_ORDER if level == "series" or c != "SeriesInstanceUID"]
    keys: dict[str, set[str]] = {}
    for column in columns:
        values: set[str] = set()
        for record in records:
            element = record.get(RESOLVE_TAGS[column])
            value = element.get("Value") if isinstance(element, dict) else None
            text = value[0] if isinstance(value, list) and value else None
            if not isinstance(text, str) or not text:
                break
            values.add(text)
        else:
            keys[column] = values
    return keys


def fallback_of(plan: Plan) -> Plan:
    """The SearchImageSets plan a QIDO-RS plan carries as its chains (the step removed)."""
    return replace(plan, qido=None)
