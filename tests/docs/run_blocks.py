"""Extract the code blocks of a Markdown file and run them in order: ``python run_blocks.py FILE``.

Used by ``test_code_blocks.py``, which starts the local service and runs this script once per
document with the environment described there; runnable by hand the same way (see README.md next to
this file). Exit status 0 when every block ran, 1 at the first failing block (its file and line are
printed), 2 on a bad command line.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

RUN_LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash"}
SKIP_WORD = "skip"
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: language, flags from the info string, code, first code line."""

    path: str
    line: int
    language: str
    words: tuple[str, ...]
    code: str

    @property
    def runs(self) -> bool:
        """Whether the docs test runs it: a python or bash fence without ``skip``."""
        return self.language in RUN_LANGUAGES and SKIP_WORD not in self.words

    @property
    def where(self) -> str:
        """``file:line`` of the block's first line of code."""
        return f"{self.path}:{self.line}"


def extract(path: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of a Markdown file, in order (CommonMark fences, ``` or ~~~).

    >>> doc = "intro\\n```bash skip\\nmake test\\n```\\n\\n```python\\nx = 1\\n```\\n"
    >>> [(b.language, b.words, b.line, b.runs) for b in extract(Path("d.md"), doc)]
    [('bash', ('skip',), 3, False), ('python', (), 7, True)]
    """
    lines = (text if text is not None else path.read_text(encoding="utf-8")).splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        words = tuple(opening["info"].split())
        start = index + 1
        index = start
        body: list[str] = []
        while index < len(lines):
            closing = lines[index].strip()
            if closing.startswith(fence[0] * len(fence)) and set(closing) == {fence[0]}:
                break
            body.append(_dedent(lines[index], indent))
            index += 1
        index += 1
        language = words[0].lower() if words else ""
        blocks.append(Block(str(path), start + 1, language, words[1:], "\n".join(body) + "\n"))
    return blocks


def _dedent(line: str, indent: int) -> str:
    stripped = len(line) - len(line.lstrip(" "))
    return line[min(indent, stripped) :]


def display(path: Path) -> Path:
    """*path* relative to the repository when it is inside it (for ``file:line`` messages)."""
    root = Path(__file__).resolve().parents[2]
    try:
        return path.resolve().relative_to(root)
    except ValueError:
        return path


def run_file(path: Path) -> int:
    """Run *path*'s blocks in order in this process's working directory; return an exit code."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    setup = (
        "import os\nimport boto3\n"
        "DATASTORE_ID = os.environ['DATASTORE_ID']\n"
        "client = boto3.client('medical-imaging')\n"
    )
    exec(compile(setup, "<docs-test setup>", "exec"), namespace)
    groups: list[int] = []
    ran = 0
    try:
        for block in extract(display(path), path.read_text(encoding="utf-8")):
            if not block.runs:
                continue
            print(f"--- {block.where} ({block.language})", flush=True)
            started = time.monotonic()
            ran += 1
            if RUN_LANGUAGES[block.language] == "python":
                try:
                    exec(compile(block.code, block.where, "exec"), namespace)
                except BaseException:
                    traceback.print_exc()
                    print(f"FAILED: the python block at {block.where}", flush=True)
                    return 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                print(f"    {time.monotonic() - started:.1f} s", flush=True)
                continue
            process = subprocess.Popen(
                ["bash", "-e", "-u", "-o", "pipefail", "-c", block.code],
                start_new_session=True,
            )
            groups.append(process.pid)
            if process.wait() != 0:
                print(f"FAILED: the bash block at {block.where} exited {process.returncode}")
                return 1
            print(f"    {time.monotonic() - started:.1f} s", flush=True)
    finally:
        for group in groups:  # background jobs a block started (`... &`) end with the file
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
    print(f"--- {ran} block(s) of {path} ran", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python run_blocks.py FILE.md", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_file(Path(sys.argv[1])))
