"""Provenance: where a frame or snapshot came from, built in one place, stored under one key.

It rides along in ``df.attrs[KEY]`` and in snapshot metadata. ``query`` and ``plan`` are JSON strings
(cheap for pandas to copy with ``attrs``) that hold the query's values, so they are PHI like the rows;
:func:`redacted` replaces them for a redacted export.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from healthimaging_df import schema
from healthimaging_df._version import __version__
from healthimaging_df.core.frames import PROVENANCE_KEY
from healthimaging_df.plan import Plan
from healthimaging_df.store.redact import RedactionPolicy, redact_query_json

KEY = PROVENANCE_KEY  # defined at the bottom layer, where every face can read it


def build(plan: Plan, query_json: str, client: Any, started: datetime) -> dict[str, Any]:
    """The provenance of a fetch of *plan* that started at *started* (refresh looks back from it)."""
    meta = getattr(client, "meta", None)
    return {
        "datastore_id": plan.datastore_id,
        "query": query_json,
        "endpoint_url": getattr(meta, "endpoint_url", None),
        "region": getattr(meta, "region_name", None),
        "plan": json.dumps(plan.requests(), default=_json_default, sort_keys=True),
        "plan_explain": plan.explain(show_values=False),
        "fetch_started_at": started.isoformat(),
        "fetched_at": datetime.now(timezone.utc).isoformat(),
        "library_version": __version__,
        "schema_version": schema.SCHEMA_VERSION,
    }


def refreshed(
    prov: dict[str, Any], client: Any, started: datetime, since: datetime
) -> dict[str, Any]:
    """*prov* after a refresh that started at *started* and fetched updates since *since*."""
    meta = getattr(client, "meta", None)
    out = dict(prov)
    out.update(
        {
            "fetched_at": datetime.now(timezone.utc).isoformat(),
            "fetch_started_at": started.isoformat(),
            "endpoint_url": getattr(meta, "endpoint_url", prov.get("endpoint_url")),
            "region": getattr(meta, "region_name", prov.get("region")),
            "refreshed_since": since.isoformat(),
        }
    )
    return out


def redacted(prov: dict[str, Any], policy: RedactionPolicy) -> dict[str, Any]:
    """Provenance without PHI: the query's values and the plan's requests are replaced."""
    out = dict(prov)
    query = prov.get("query")
    out["query"] = redact_query_json(query)  # refuses (typed) what it cannot read
    # keyed and salted: lets a refresh check "same key, same query" without storing either
    out["redaction_fingerprints"] = policy.fingerprints(query if isinstance(query, str) else None)
    explained = prov.get("plan_explain")
    out["plan"] = explained if isinstance(explained, str) else None
    out["redaction"] = json.dumps(policy.describe(), sort_keys=True)
    return out


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    raise TypeError(type(value).__name__)
