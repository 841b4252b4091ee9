"""Random updates of a datastore while a query pages through it (the ``update_rate`` fault).

An update gives a random image set version + 1 and a newer updatedAt, as an
UpdateImageSetMetadata would; optionally it also moves some tags (or isPrimary), so the image
set's match changes mid-query. New values are taken from other image sets where one differs,
so a changed image set typically moves from one patient's or modality's result to another's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from healthimaging_df.local.state import Datastore
from healthimaging_df.local.values import UID_ATTRIBUTES

__all__ = ["random_update"]

_MODALITIES = ("CT", "MR", "CR", "DX", "US", "PT", "NM", "MG", "SR")
_UID_ROOT = "1.2.826.0.1.3680043.8.498."
_DONOR_DRAWS = 8


def _new_value(store: Datastore, tag: str, old: Any, rng: random.Random) -> Any:
    for _ in range(_DONOR_DRAWS):
        donor = store.current[store.order[rng.randrange(len(store.order))]]
        value = donor["DICOMTags"].get(tag)
        if value is not None and value != old:
            return value
    if tag == "DICOMSeriesModality":
        return rng.choice([m for m in _MODALITIES if m != old])
    if tag in UID_ATTRIBUTES:
        return _UID_ROOT + str(rng.randrange(10**20, 10**30))
    return f"CHANGED{rng.randrange(10**7, 10**8)}"


def random_update(
    store: Datastore,
    rng: random.Random,
    change_tags: Sequence[str],
    change_rate: float,
    now: datetime,
) -> tuple[str, bool] | None:
    """Update one random image set of ``store``; return ``(imageSetId, match_may_change)``.

    None when the datastore is empty. The caller holds the backend lock.
    """
    if not store.order:
        return None
    image_set_id = store.order[rng.randrange(len(store.order))]
    tags: dict[str, Any] = {}
    is_primary: bool | None = None
    if change_tags and rng.random() < change_rate:
        record = store.current[image_set_id]
        for tag in change_tags:
            if tag == "isPrimary":
                is_primary = not bool(record.get("isPrimary", True))
            else:
                tags[tag] = _new_value(store, tag, record["DICOMTags"].get(tag), rng)
    store.update(image_set_id, is_primary=is_primary, tags=tags, now=None, clock_now=now)
    return image_set_id, bool(tags) or is_primary is not None
