"""Redaction policies for exports (public path; the implementation is ``store.redact``)."""

from __future__ import annotations

from healthimaging_df.store.redact import (
    DEFAULT_DROP,
    DEFAULT_HASH,
    RedactionPolicy,
    apply_redaction,
    generate_key,
)

__all__ = ["DEFAULT_DROP", "DEFAULT_HASH", "RedactionPolicy", "apply_redaction", "generate_key"]
