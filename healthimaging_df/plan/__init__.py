"""The pure planner: validated predicates in, request chains and client-side checks out.

Nothing here sends a request: a plan is data, tested without a server. The engine runs it.
"""

from __future__ import annotations

from healthimaging_df.plan.planner import (
    PAGE_ROWS,
    QIDO_RECORDS,
    SCAN_OVERHEAD,
    STABLE_SORT,
    STRATEGIES,
    AnyOf,
    Candidate,
    Chain,
    DatastoreStats,
    Plan,
    QidoSearch,
    QidoStep,
    Strategy,
    any_of,
    compile_plan,
    keeps_primary_only,
    presplit,
    presplit_at,
    rows_between,
    scan_requests,
    union,
)

__all__ = [
    "PAGE_ROWS",
    "QIDO_RECORDS",
    "SCAN_OVERHEAD",
    "STABLE_SORT",
    "STRATEGIES",
    "AnyOf",
    "Candidate",
    "Chain",
    "DatastoreStats",
    "Plan",
    "QidoSearch",
    "QidoStep",
    "Strategy",
    "any_of",
    "compile_plan",
    "keeps_primary_only",
    "presplit",
    "presplit_at",
    "rows_between",
    "scan_requests",
    "union",
]
