"""Every code block of README.md and docs/*.md runs, against the local service.

The convention (also in README.md next to this file), for anyone writing docs:

- Fences ```` ```python ```` (or ``py``) and ```` ```bash ```` (or ``sh``) run; any other fence
  (``json``, ``text``, ``console``, ``sql``, ``toml``...) is never run: use those for output,
  IAM policies and other things that are not commands.
- A python or bash block that cannot run here (``make test`` itself, ``git clone``, steps that
  need a real AWS account) is marked with the word ``skip`` in its info string: ```` ```bash skip ````
  (GitHub still highlights it as bash). Keep these few.
- Each document runs in a fresh Python process and a fresh, empty working directory, blocks in
  document order: python blocks share one namespace (like notebook cells), bash blocks run with
  ``bash -euo pipefail``; files written by one block are there for the next. Background jobs a
  bash block starts (``... &``) are stopped when the document ends.
- Provided: a running local HealthImaging service seeded with ``IMAGE_SETS`` synthetic image
  sets (seed ``SEED``); in the environment of every block, the variables that point an unmodified
  boto3, and so the ``healthimaging-df`` command, at it (``AWS_ENDPOINT_URL_MEDICAL_IMAGING``,
  ``AWS_DISABLE_HOST_PREFIX_INJECTION=true``, dummy keys, ``AWS_DEFAULT_REGION``; no AWS config
  files) and ``DATASTORE_ID``; ``healthimaging-df`` on ``PATH``, and ``.venv`` in the working
  directory, so ``.venv/bin/healthimaging-df`` works as after ``make demo``. Python blocks start
  with ``DATASTORE_ID`` (str) and ``client`` (``boto3.client("medical-imaging")``) defined.
- DeprecationWarning and FutureWarning in a python block are errors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from healthimaging_df.local import LocalService

from .run_blocks import extract

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("run_blocks.py")
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
IMAGE_SETS = 1_000
SEED = 42
VENV = Path(sys.prefix)


@pytest.fixture(scope="module")
def service() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=IMAGE_SETS, seed=SEED) as svc:
        yield svc


def block_env(service: LocalService) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.pop("PYTHONWARNINGS", None)
    env.update(service.env())
    env.update(
        DATASTORE_ID=str(service.datastore_id),
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def run_document(
    path: Path, service: LocalService, workdir: Path
) -> subprocess.CompletedProcess[str]:
    (workdir / ".venv").symlink_to(VENV, target_is_directory=True)
    return subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning",
         str(RUNNER), str(path)],
        cwd=workdir, env=block_env(service), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_code_blocks_run(document: Path, service: LocalService, tmp_path: Path) -> None:
    result = run_document(document, service, tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    runnable = [b for b in extract(document) if b.runs]
    assert f"--- {len(runnable)} block(s) of " in result.stdout


def test_readme_gets_a_new_user_to_a_parquet_cohort() -> None:
    """Two quick-start commands, then one CLI call that writes Parquet and is run by the test."""
    blocks = extract(REPO / "README.md")
    shell = [b for b in blocks if b.language == "bash"]
    quick_start = next(b for b in shell if "make demo" in b.code)
    assert "make test" in quick_start.code
    assert not quick_start.runs  # `make test` would run this very test
    commands = [line.split("#")[0].strip() for line in quick_start.code.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]
    first_run = shell[shell.index(quick_start) + 1]
    assert first_run.runs
    assert re.search(r"\.venv/bin/healthimaging-df search .*--out \S+\.parquet", " ".join(
        first_run.code.replace("\\\n", " ").split()
    ))  # fmt: skip


@pytest.mark.parametrize("document", ["README.md", "docs/index.md", "docs/security.md"])
def test_relative_links_resolve(document: str) -> None:
    path = REPO / document
    text = path.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "no relative links found"
    missing = [t for t in local if not (path.parent / t).exists()]
    assert missing == []


def test_a_failing_block_is_reported_with_its_file_and_line(
    service: LocalService, tmp_path: Path
) -> None:
    doc = tmp_path / "broken.md"
    doc.write_text(
        "# t\n\n```bash skip\nexit 3\n```\n\n```json\n{}\n```\n\n"
        "```bash\necho made > made.txt\n```\n\n"
        "```python\nassert open('made.txt').read() == 'made\\n'\nx = DATASTORE_ID\n```\n\n"
        "```python\nassert x == DATASTORE_ID\nraise ValueError('boom')\n```\n",
        encoding="utf-8",
    )
    work = tmp_path / "work"
    work.mkdir()
    result = run_document(doc, service, work)
    assert result.returncode == 1
    assert f"FAILED: the python block at {doc}:21" in result.stdout
    assert "ValueError: boom" in result.stderr
    assert result.stdout.count("--- ") == 3


def test_the_readme_patients_have_ct_or_mr_in_every_local_dataset() -> None:
    """The README's --ids-from example shows rows against `local serve` (1,000 image sets, seed
    0), `--local` (5,000, seed 42) and the docs test (1,000, seed 42), not an empty file."""
    from healthimaging_df.local import generate_image_sets

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if "> patients.txt" in x)
    patients = re.findall(r"\b(PAT\d{6})\b", line)
    assert len(patients) == 3
    for image_sets, seed in ((1_000, 0), (5_000, 42), (IMAGE_SETS, SEED)):
        found = {
            (r["DICOMTags"].get("DICOMPatientId"), r["DICOMTags"].get("DICOMSeriesModality"))
            for r in generate_image_sets(image_sets, seed=seed)
        }
        for patient in patients:
            assert {(patient, "CT"), (patient, "MR")} & found, (patient, image_sets, seed)


def test_the_readme_says_when_to_use_each_local_service() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Without AWS", 1)[1].split("\n## ", 1)[0]
    for way in ("`--local`", "`healthimaging-df local serve`", "`LocalService.seeded(...)`"):
        assert way in section
