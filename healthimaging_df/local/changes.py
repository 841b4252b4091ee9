"""What the backend tells its listeners after a write: one :class:`Change` per image set touched.

The events module turns changes into EventBridge-shaped events; tests may subscribe directly
(``Backend.subscribe``). Listeners run after the backend lock is released, in write order.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KINDS", "Change"]

KINDS = ("created", "updated", "copied", "copy_source", "deleted")


@dataclass(frozen=True)
class Change:
    """One image set created, updated, copied (into), read as a copy's source, or deleted.

    Attributes
    ----------
    kind
        One of :data:`KINDS`; ``copied`` is the destination of a CopyImageSet (new or existing),
        ``copy_source`` its source (read, unchanged).
    datastore_id, image_set_id
        Which image set.
    version
        Its version after the change (before it, for ``deleted`` and ``copy_source``).
    previous_version
        Its version before the change (``updated`` and ``copied`` into an existing image set).
    is_primary
        Whether it is a primary image set after the change.
    source_image_set_id
        For ``copied``: the source image set.
    """

    kind: str
    datastore_id: str
    image_set_id: str
    version: int
    is_primary: bool
    previous_version: int | None = None
    source_image_set_id: str | None = None
