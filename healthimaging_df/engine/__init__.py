"""The engine: the only place where fetch, frame and storage meet.

A plan is run one of four ways (:mod:`healthimaging_df.engine.run`): ``collect`` (one frame),
``chunks`` (bounded memory), ``export`` (checkpointed, spilled, through a writer the caller
passes) and ``changes`` (a refresh's delta).
"""

from __future__ import annotations

from healthimaging_df.engine.prepared import Run
from healthimaging_df.engine.run import (
    changes,
    check_positive_int,
    choose,
    chunks,
    collect,
    collect_table,
    export,
    facts_for,
    prepare,
    presplit_pieces,
    table_chunks,
)

__all__ = [
    "Run",
    "changes",
    "check_positive_int",
    "choose",
    "chunks",
    "collect",
    "collect_table",
    "export",
    "facts_for",
    "prepare",
    "presplit_pieces",
    "table_chunks",
]
