"""``healthimaging-df demo`` (``make demo``): the cohort and its numbers first, the plan on request."""

from __future__ import annotations

import pytest

from healthimaging_df.cli import app as cli


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = cli.main(["demo", "--image-sets", "800", "--latency-ms", "0", *argv])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_the_demo_leads_with_the_cohort_and_keeps_the_plan_for_explain(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run(capsys)
    lines = out.strip().splitlines()
    assert lines[0].startswith("Cohort: ")
    assert " image sets, " in lines[1]
    assert " studies, " in lines[1]
    assert " patients" in lines[1]
    fetched = [line for line in lines if line.startswith("Fetched ")]
    assert len(fetched) == 1
    assert "SearchImageSets request" in fetched[0]
    assert "access paths weighed" not in out
    assert "pushed down" not in out
    assert len(lines) <= 20
    explained = run(capsys, "--explain")
    assert "pushed down to the API" in explained
    assert explained.index("Cohort: ") < explained.index("Plan for datastore")
