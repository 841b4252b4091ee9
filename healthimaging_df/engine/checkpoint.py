"""The export checkpoint: finished fetch tasks, their matching rows and what they read.

The engine's export saves one after every few finished tasks; a rerun of the same query (same
fingerprint) resumes from it. A plain export keeps it beside the target (``<path>.ahi-checkpoint``);
a redacted export, whose checkpoint holds the unredacted rows, keeps it in a private local folder
(mode 0700) under the user's cache directory (:func:`private_root`), never at the destination. Besides the matching rows it keeps the
``(imageSetId, version, updatedAt)`` of every row read, so that a resumed export drops superseded
copies exactly as an uninterrupted one. It is deleted once the snapshot is written.

Finished chains are recorded by what they send (:func:`chain_key`, a digest of the chain's search
criteria), not by their number: a plan compiled again on resume may number its chains otherwise
(a QIDO-RS plan's chains follow QIDO-RS's answer, which can change between runs), and a chain
that is new, or sends other criteria, then runs while every unchanged one is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from healthimaging_df import schema
from healthimaging_df.core import dates
from healthimaging_df.engine.fetch import Coverage
from healthimaging_df.engine.statistics import cache_dir
from healthimaging_df.errors import SnapshotError
from healthimaging_df.plan import Chain, Plan, Strategy
from healthimaging_df.store.storage import Store, Target, local_store
from healthimaging_df.store.tables import parquet_bytes, write_parquet

PART_ROWS = 50_000  # a part holds about this many rows (more only from an older checkpoint)
log = logging.getLogger("healthimaging_df.snapshot")  # the logger these warnings always used


def fingerprint(query_json: str) -> str:
    """A digest of the query (``Query.to_dict()`` JSON) and the schema version."""
    canonical = json.dumps(json.loads(query_json), sort_keys=True)
    return hashlib.sha256(f"{canonical}|{schema.SCHEMA_VERSION}".encode()).hexdigest()


def chain_key(chain: Chain) -> str:
    """A chain's identity across runs: a digest of its search criteria (window included).

    A digest, so the state file holds no value a chain filters on (UIDs, patient IDs).
    """
    criteria = json.dumps(chain.criteria(), sort_keys=True, default=str)
    return hashlib.sha256(criteria.encode()).hexdigest()[:32]


def private_root() -> Path:
    """The private checkpoint folder (created with mode 0700; an existing one is set to 0700)."""
    root = cache_dir() / "checkpoints"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    return root


def private_store(destination: str) -> tuple[Store, str]:
    """Where the checkpoint of a redacted export to *destination* lives: the store and folder.

    The folder is named by a digest of the destination (paths may embed values), in
    :func:`private_root`.
    """
    digest = hashlib.sha256(destination.encode()).hexdigest()[:32]
    return local_store(str(private_root())), digest


class Checkpoint:
    """Completed fetch tasks, their matching rows and the ranks they read.

    Beside the snapshot by default; *location* (a store and a folder in it, see
    :func:`private_store`) puts it elsewhere.
    """

    def __init__(
        self, target: Target, fingerprint: str, location: tuple[Store, str] | None = None
    ) -> None:
        self.store, self.folder = location or (target.store, target.checkpoint)
        self.fingerprint = fingerprint
        self.parts: list[str] = []
        self.seen_parts: list[str] = []
        self.access: Strategy = "auto"  # the access path of the plan the coverage belongs to
        self.now = datetime.now(timezone.utc)
        self.started_at = self.now
        self.resumed_tasks = 0
        self.tasks = 0
        self.rows = 0
        self._pending: list[str] = []  # parts written, not yet in the state file
        self._pending_rows = 0
        self._pending_seen: list[pa.Table] = []
        self._pending_tasks = 0
        self._flushed = time.monotonic()
        self._keys: dict[int, str] = {}  # chain number -> chain_key, for the plan being run
        self._saved_chains: set[str] = set()
        self._saved_windows: dict[str, list[tuple[datetime, datetime]]] = {}

    @property
    def state_rel(self) -> str:
        """The state file's relative path (the commit point)."""
        return f"{self.folder}/state.json"

    def load(self) -> Coverage | None:
        """Return the saved coverage, or None to start afresh."""
        raw = self.store.get(self.state_rel)
        if raw is None:
            return None
        try:
            state = json.loads(raw)
            if state.get("fingerprint") != self.fingerprint or "seen_parts" not in state:
                log.warning("ignoring the export checkpoint: it is of another query")
                self.discard()
                return None
            present = set(self.store.list(self.folder))
            listed = [f"{self.folder}/{name}" for name in [*state["parts"], *state["seen_parts"]]]
            if any(name not in present for name in listed):
                # a run killed while it deleted a finished export's checkpoint: nothing to resume
                log.warning("ignoring the export checkpoint: its part files are gone")
                self.discard()
                return None
            return self._restore(state)
        except (ValueError, KeyError, TypeError, AttributeError):  # dates.TimestampError too
            raise SnapshotError(
                "the export checkpoint is damaged; pass resume=False to start afresh"
            ) from None

    def _restore(self, state: dict[str, Any]) -> Coverage:
        """Coverage and counters from a checkpoint's state of this query."""
        self.now = dates.read_iso(state["now"])
        self.started_at = dates.read_iso(state["started_at"])
        self.parts = list(state["parts"])
        self.seen_parts = list(state.get("seen_parts", ()))
        self.access = state.get("access", "auto")
        self.tasks = self.resumed_tasks = int(state["tasks"])
        self.rows = int(state["rows"])
        spans = {
            str(chain): [(dates.read_iso(a), dates.read_iso(b)) for a, b in spans]
            for chain, spans in state["windows"].items()
        }
        if state.get("chain_keys"):
            self._saved_chains = {str(c) for c in state["chains"]}
            self._saved_windows = spans
            return Coverage()  # in chain numbers once bound to the plan that runs (bind)
        # an older checkpoint numbered its chains: a plan of the same access numbers them alike
        return Coverage(
            chains={int(c) for c in state["chains"]},
            windows={int(c): w for c, w in spans.items()},
        )

    def bind(self, plan: Plan, coverage: Coverage | None) -> Coverage | None:
        """*coverage* in *plan*'s chain numbers (chains recorded by :func:`chain_key`).

        Saves from now on record *plan*'s chains by key; saved chains the plan no longer has
        are kept (their rows stay in the checkpoint either way).
        """
        self._keys = {c.index: chain_key(c) for c in plan.chains}
        if coverage is None or not (self._saved_chains or self._saved_windows):
            return coverage
        for index, key in self._keys.items():
            if key in self._saved_chains:
                coverage.chains.add(index)
            if key in self._saved_windows:
                coverage.windows[index] = list(self._saved_windows[key])
        return coverage

    def add(
        self, tables: Iterable[pa.Table], seen: pa.Table, coverage: Coverage, interval: float
    ) -> None:
        """Record one finished task; persist when *interval* seconds passed since the last save.

        *tables* hold the task's matching rows (written to parts of about ``PART_ROWS`` rows as
        they come, so a task's rows never sit in memory whole), *seen* the ranks of the rows it
        read that did not match. The parts count once the state file names them (:meth:`flush`).
        """
        rest = iter(tables)
        while (first := next((t for t in rest if t.num_rows), None)) is not None:
            self._pending.append(self._stream_part(first, rest))
        self._pending_seen.append(seen)
        self._pending_tasks += 1
        if time.monotonic() - self._flushed >= interval:
            self.flush(coverage)

    def flush(self, coverage: Coverage) -> None:
        """Persist pending tasks; the state file written last is the commit point."""
        if not self._pending_tasks:
            return
        self.parts.extend(self._pending)
        seen = pa.concat_tables(self._pending_seen)
        if seen.num_rows:
            self.seen_parts.append(self._put_part(seen))
        self.tasks += self._pending_tasks
        self.rows += self._pending_rows
        state = {
            "format": "healthimaging_df.engine.checkpoint",
            "fingerprint": self.fingerprint,
            "now": self.now.isoformat(),
            "started_at": self.started_at.isoformat(),
            **self._coverage_state(coverage),
            "parts": self.parts,
            "seen_parts": self.seen_parts,
            "access": self.access,
            "tasks": self.tasks,
            "rows": self.rows,
        }
        self.store.put(self.state_rel, json.dumps(state).encode())  # the commit point
        self._pending = []
        self._pending_rows = 0
        self._pending_seen = []
        self._pending_tasks = 0
        self._flushed = time.monotonic()

    def _coverage_state(self, coverage: Coverage) -> dict[str, Any]:
        """The state's ``chains`` and ``windows``: by chain key once bound, else by number."""
        windows = {
            self._keys.get(chain, str(chain)): spans for chain, spans in coverage.windows.items()
        }
        chains = {self._keys.get(chain, str(chain)) for chain in coverage.chains}
        if self._keys:  # saved chains the plan no longer has: kept for a later resume
            chains |= self._saved_chains
            windows = {**self._saved_windows, **windows}
        return {
            "chain_keys": bool(self._keys),
            "chains": sorted(chains) if self._keys else sorted(coverage.chains),
            "windows": {
                key: [[a.isoformat(), b.isoformat()] for a, b in spans]
                for key, spans in windows.items()
            },
        }

    def _stream_part(self, first: pa.Table, rest: Iterator[pa.Table]) -> str:
        """Write *first* and tables of *rest* until ``PART_ROWS`` rows as one part, as they come."""
        rows = 0

        def tables() -> Iterator[pa.Table]:
            nonlocal rows
            table: pa.Table | None = first
            while table is not None:
                yield table
                rows += table.num_rows
                table = next(rest, None) if rows < PART_ROWS else None

        name = f"part-{uuid.uuid4().hex}.parquet"
        self.store.put_stream(
            f"{self.folder}/{name}",
            lambda sink: write_parquet(sink, tables(), {}, "zstd", 128 * 1024),
        )
        self._pending_rows += rows
        return name

    def _put_part(self, table: pa.Table) -> str:
        name = f"part-{uuid.uuid4().hex}.parquet"
        data = parquet_bytes(table, {}, "zstd", 128 * 1024)
        self.store.put(f"{self.folder}/{name}", data)
        return name

    def _read_parts(self, names: list[str]) -> list[pa.Table]:
        saved = []
        for name in names:
            data = self.store.get(f"{self.folder}/{name}")
            if data is None:
                raise SnapshotError("a checkpoint part file is missing; rerun with resume=False")
            saved.append(pq.read_table(pa.BufferReader(data)))
        return saved

    def rows_of(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The matching rows of every saved task, one part at a time (only *columns* if given).

        Always in the same order: call after :meth:`flush`.
        """
        for name in self.parts:
            data = self.store.get(f"{self.folder}/{name}")
            if data is None:
                raise SnapshotError("a checkpoint part file is missing; rerun with resume=False")
            yield pq.read_table(pa.BufferReader(data), columns=columns)

    def schema(self) -> pa.Schema | None:
        """The columns of the saved rows, or None when no task matched a row."""
        if not self.parts:
            return None
        data = self.store.get(f"{self.folder}/{self.parts[0]}")
        if data is None:
            raise SnapshotError("a checkpoint part file is missing; rerun with resume=False")
        return pq.read_schema(pa.BufferReader(data))

    def seen(self) -> list[pa.Table]:
        """Ranks of the rows read that did not match, of every saved task (after :meth:`flush`)."""
        return self._read_parts(self.seen_parts)

    def discard(self) -> None:
        """Delete the checkpoint: its state first, so a kill midway leaves no state without parts."""
        self.store.delete([self.state_rel])
        self.store.delete(self.store.list(self.folder))
