"""The numbers and names the planner's modules share: page sizes, quotas, strategies, sort orders.

Kept apart so that the model, the cost model, the QIDO-RS step and ``explain()`` read one
definition each (none of them imports another to learn a constant).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

Filter = dict[str, Any]
Strategy = Literal["auto", "fanout", "scan", "search", "qido"]
# "search": SearchImageSets only (never QIDO-RS); "qido": QIDO-RS first whenever it can match.
STRATEGIES: tuple[Strategy, ...] = ("auto", "fanout", "scan", "search", "qido")

DEFAULT_SORT = "updatedAt"
STABLE_SORT = {"sortField": "createdAt", "sortOrder": "ASC"}  # no update moves a row in it
WINDOW_FLOOR = datetime(1970, 1, 1, tzinfo=timezone.utc)

PAGE_ROWS = 50  # SearchImageSets' largest page
# An IN list this short always fans out: even a one-page scan would not save a request worth a
# probe of the datastore's size.
ALWAYS_FAN_OUT = 10
SCAN_OVERHEAD = 1.05  # a windowed scan's extra requests per minimum page (windows' last pages)
PROBE_REQUESTS = 10  # what measuring an unknown datastore costs (see engine.statistics)
ENDS_REQUESTS = 2  # a first scan of the whole datastore finds only its two ends
CHAIN_PROBE_REQUESTS = 2  # sizing one chain: its first page, and its newest row when needed
QIDO_RECORDS = 1000  # records a QIDO-RS request returns at most
# IN lists of QIDO-able columns multiply into searches; past this, fewer keys
QIDO_MAX_SEARCHES = 16
# QIDO-RS is chosen when its lower bound (searches, the empty pages ending them, the sweep, one
# chain) times this is at most the plan it replaces: its answer's chains are unknown until it
# answers, and a lost bet costs that plan plus the finding out (a page, a sweep's first page).
QIDO_MARGIN = 2.5
RECORDS_PER_SCAN_REQUEST = 10  # QIDO-RS budget: records worth one request of the plan replaced
NO_STATS_RECORDS = 10_000  # records read before giving up when the replaced plan's cost is unknown
# A sweep estimated at most this many pages runs as one chain: every page full, no window's
# part-empty last page (windows would add up to one request per worker for little speed).
SWEEP_ONE_CHAIN_PAGES = 20
PRESPLIT_MIN_PAGES = 4  # fewer pages than this per piece: not worth a piece's part-empty page
