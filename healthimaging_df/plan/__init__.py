"""The pure planner: validated predicates and known facts in, request chains and checks out.

Nothing here sends a request: a plan is data, tested without a server. The engine gathers the
facts a plan needs (``Plan.needs``), compiles once from them, and runs the plan.

- ``predicates``: validated conditions and their exact Arrow evaluation
- ``facts``: a query's parts (``Spec``), what is known (``Facts``), what to measure (``Needs``)
- ``model``: ``Plan``, ``Chain``, ``Candidate``; ``explain``: the readable account of a plan
- ``costs``: requests per access path; ``qido``: what QIDO-RS may match, the step a plan carries
- ``compile``: ``compile_spec`` / ``compile_plan``, pre-split scans (a union: a ``Spec`` with ``union``)
- ``resolve``: a QIDO-RS answer into the SearchImageSets plan that runs
"""

from __future__ import annotations

from healthimaging_df.plan.compile import (
    compile_plan,
    compile_spec,
    presplit,
    presplit_at,
    presplit_for_run,
    presplit_pieces,
    whole_scan,
)
from healthimaging_df.plan.conditions import keeps_primary_only
from healthimaging_df.plan.costs import plan_requests, scan_requests, sweep_requests
from healthimaging_df.plan.facts import (
    ChainSize,
    DatastoreStats,
    Facts,
    Needs,
    QidoAccess,
    Spec,
    chain_key,
)
from healthimaging_df.plan.limits import (
    PAGE_ROWS,
    QIDO_RECORDS,
    SCAN_OVERHEAD,
    STABLE_SORT,
    STRATEGIES,
    Strategy,
)
from healthimaging_df.plan.model import AnyOf, Candidate, Chain, Plan, any_of, rows_between
from healthimaging_df.plan.qido import (
    CONSISTENT_OPTION,
    QidoSearch,
    QidoStep,
    Sweep,
    fallback_of,
)
from healthimaging_df.plan.resolve import Resolution, fall_back, resolve

__all__ = [
    "CONSISTENT_OPTION",
    "PAGE_ROWS",
    "QIDO_RECORDS",
    "SCAN_OVERHEAD",
    "STABLE_SORT",
    "STRATEGIES",
    "AnyOf",
    "Candidate",
    "Chain",
    "ChainSize",
    "DatastoreStats",
    "Facts",
    "Needs",
    "Plan",
    "QidoAccess",
    "QidoSearch",
    "QidoStep",
    "Resolution",
    "Spec",
    "Strategy",
    "Sweep",
    "any_of",
    "chain_key",
    "compile_plan",
    "compile_spec",
    "fall_back",
    "fallback_of",
    "keeps_primary_only",
    "plan_requests",
    "presplit",
    "presplit_at",
    "presplit_for_run",
    "presplit_pieces",
    "resolve",
    "rows_between",
    "scan_requests",
    "sweep_requests",
    "whole_scan",
]
