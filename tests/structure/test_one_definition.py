"""Each shared rule has one definition: a copy written again elsewhere in the package fails here.

The rules and where they live (docs/architecture.md, "One definition"): argument checks in
``core/checks.py``, our own timestamps in ``core/dates.py``, the pandas type mapper in ``schema.py``,
the provenance key in ``core/frames.py``, default quotas in ``aws/quotas.py``, AWS error translation
in ``aws/errors.py``, retry with backoff in ``aws/retry.py``. ``PENDING`` lists the files still to
adopt a rule (owned by work in flight); empty it as they do.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "healthimaging_df"

RULES: dict[str, tuple[str, str]] = {
    # name: (pattern of a hand-written copy, the one module allowed to hold it)
    "positive int, not bool": (
        r"isinstance\([\w.]+, bool\) or not isinstance\([\w.]+, int\)",
        "core/checks.py",
    ),
    "a quota literal as a default": (r"max_tps: float \| None = \d", "aws/quotas.py"),
    "the provenance key as a literal": (r"attrs(\.get\(|\[)\"healthimaging_df\"", "core/frames.py"),
    "ISO timestamps read by hand": (r"datetime\.fromisoformat\(", "core/dates.py"),
    "a pandas type mapper": (r"def _\w*(nullable|pandas_type)\w*\(", "schema.py"),
    "botocore's error dict read by hand": (r"\.response\.get\(\"Error\"", "aws/errors.py"),
    "an exponential backoff by hand": (r"\* 2 ?\*\* ?\(?attempt", "aws/retry.py"),
    "a boto3 session or client made by hand": (
        r"boto3\.Session\(|\b(?!aws_session\b)\w+\.client\(\s*\"",  # not the factory
        "aws/session.py",
    ),
}

# Files owned by work in flight that still hold a copy: rule -> files (relative to the package).
PENDING: dict[str, set[str]] = {
    "positive int, not bool": set(),
    "a quota literal as a default": set(),
    "the provenance key as a literal": set(),
    "ISO timestamps read by hand": set(),
    "a pandas type mapper": set(),
    "botocore's error dict read by hand": set(),
    "an exponential backoff by hand": set(),
    "a boto3 session or client made by hand": set(),
}


def _sources() -> dict[str, str]:
    """Each module's code (lines quoting code in double backticks are prose, left out).

    ``local/`` is left out: the stand-in service imports nothing of the package.
    """
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE)
        if name.parts[0] != "local":
            lines = path.read_text().splitlines()
            found[str(name)] = "\n".join(line for line in lines if "``" not in line)
    return found


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_is_defined_once(rule: str) -> None:
    pattern, home = RULES[rule]
    found = {name for name, text in _sources().items() if re.search(pattern, text)}
    copies = found - {home} - PENDING[rule]
    assert not copies, f"{rule}: use {home} instead of writing it again in {sorted(copies)}"


@pytest.mark.parametrize("rule", sorted(RULES))
def test_pending_list_is_current(rule: str) -> None:
    """A file that adopted the shared definition leaves ``PENDING``, so it cannot slip back."""
    pattern, _ = RULES[rule]
    sources = _sources()
    adopted = {f for f in PENDING[rule] if not re.search(pattern, sources.get(f, ""))}
    assert not adopted, f"{rule}: remove {sorted(adopted)} from PENDING (they adopted it)"
