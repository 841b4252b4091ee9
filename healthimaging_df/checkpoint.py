"""The export checkpoint: finished fetch tasks and their rows, saved next to the snapshot.

``export_query`` saves one after every few finished tasks (``<path>.ahi-checkpoint``); a rerun of
the same query (same fingerprint) resumes from it. It holds unredacted rows (PHI) and is deleted
once the snapshot is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from healthimaging_df import schema
from healthimaging_df.errors import SnapshotError
from healthimaging_df.tables import _parquet_bytes

if TYPE_CHECKING:
    from healthimaging_df.query import Query
    from healthimaging_df.storage import _Target

log = logging.getLogger("healthimaging_df.snapshot")  # the logger these warnings always used


def _fingerprint(query: Query) -> str:
    text = json.dumps(query.to_dict(), sort_keys=True) + "|" + schema.SCHEMA_VERSION
    return hashlib.sha256(text.encode()).hexdigest()


class _Checkpoint:
    """Completed fetch tasks and their (filtered) rows, stored next to the snapshot."""

    def __init__(self, target: _Target, fingerprint: str) -> None:
        self.target = target
        self.fingerprint = fingerprint
        self.parts: list[str] = []
        self.now = datetime.now(timezone.utc)
        self.started_at = self.now
        self.resumed_tasks = 0
        self.tasks = 0
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_tasks = 0
        self._flushed = time.monotonic()

    @property
    def state_rel(self) -> str:
        return f"{self.target.checkpoint}/state.json"

    def load(self) -> Any:
        """Return the saved coverage (a ``fetch.Coverage``), or None to start afresh."""
        from healthimaging_df.fetch import Coverage

        raw = self.target.store.get(self.state_rel)
        if raw is None:
            return None
        state = json.loads(raw)
        if state.get("fingerprint") != self.fingerprint:
            log.warning(
                "ignoring the checkpoint at %s: it belongs to a different query",
                self.target.store.uri(self.target.checkpoint),
            )
            self.discard()
            return None
        self.now = datetime.fromisoformat(state["now"])
        self.started_at = datetime.fromisoformat(state["started_at"])
        self.parts = list(state["parts"])
        self.tasks = self.resumed_tasks = int(state["tasks"])
        self.rows = int(state["rows"])
        windows = {
            int(chain): [(datetime.fromisoformat(a), datetime.fromisoformat(b)) for a, b in spans]
            for chain, spans in state["windows"].items()
        }
        return Coverage(chains=set(state["chains"]), windows=windows)

    def add(self, table: pa.Table, coverage: Any, interval: float) -> None:
        """Record one finished task; persist when *interval* seconds passed since the last save."""
        self._pending.append(table)
        self._pending_tasks += 1
        if time.monotonic() - self._flushed >= interval:
            self.flush(coverage)

    def flush(self, coverage: Any) -> None:
        if not self._pending_tasks:
            return
        rows = pa.concat_tables(self._pending)
        if rows.num_rows:
            name = f"part-{uuid.uuid4().hex}.parquet"
            self.target.store.put(
                f"{self.target.checkpoint}/{name}", _parquet_bytes(rows, {}, "zstd", 128 * 1024)
            )
            self.parts.append(name)
        self.tasks += self._pending_tasks
        self.rows += rows.num_rows
        state = {
            "format": "healthimaging_df.checkpoint",
            "fingerprint": self.fingerprint,
            "now": self.now.isoformat(),
            "started_at": self.started_at.isoformat(),
            "chains": sorted(coverage.chains),
            "windows": {
                str(chain): [[a.isoformat(), b.isoformat()] for a, b in spans]
                for chain, spans in coverage.windows.items()
            },
            "parts": self.parts,
            "tasks": self.tasks,
            "rows": self.rows,
        }
        self.target.store.put(self.state_rel, json.dumps(state).encode())  # the commit point
        self._pending = []
        self._pending_tasks = 0
        self._flushed = time.monotonic()

    def tables(self) -> list[pa.Table]:
        """Rows of every saved and pending task."""
        saved = []
        for name in self.parts:
            data = self.target.store.get(f"{self.target.checkpoint}/{name}")
            if data is None:
                raise SnapshotError("a checkpoint part file is missing; rerun with resume=False")
            saved.append(pq.read_table(pa.BufferReader(data)))
        return saved + self._pending

    def discard(self) -> None:
        store = self.target.store
        store.delete(store.list(self.target.checkpoint))
