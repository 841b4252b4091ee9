"""Shared helpers: peak memory of a callable, and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """Seconds and peak resident memory growth (bytes, sampled every ms) of one call."""
    start_rss = _rss()
    peak = start_rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = max(peak, _rss())
    return seconds, peak - start_rss, result


def machine() -> str:
    return f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.machine()}"


def write_section(title: str, body: str) -> None:
    """Replace the body of ``## {title}`` in docs/benchmarks.md (up to the next ``## ``)."""
    text = DOC.read_text(encoding="utf-8")
    pattern = re.compile(rf"(^## {re.escape(title)}\n)(.*?)(?=^## |\Z)", re.S | re.M)
    if not pattern.search(text):
        text = text.rstrip() + f"\n\n## {title}\n"
    text = pattern.sub(lambda m: m.group(1) + "\n" + body.strip() + "\n\n", text, count=1)
    DOC.write_text(text.rstrip() + "\n", encoding="utf-8")
