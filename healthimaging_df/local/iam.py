"""IAM actions of ``medical-imaging`` and the local service's deny list.

A correctly signed request whose action is denied gets HTTP 403 ``AccessDeniedException``
(the model's error shape) with the message IAM writes, naming the principal, the action and the
resource ARN (a datastore or image-set ARN: ids only, no PHI).

The action list is the Service Authorization Reference's (``aws-facts.md`` §5). The three
DICOMweb searches authorise every QIDO-RS resource: ``/studies`` is ``SearchDICOMStudies``;
``/series`` and ``/studies/{S}/series`` are ``SearchDICOMSeries``; ``/instances``,
``/studies/{S}/instances`` and ``/studies/{S}/series/{Se}/instances`` are
``SearchDICOMInstances`` (no separate actions exist for the datastore-wide resources).
"""

from __future__ import annotations

from collections.abc import Iterable

from healthimaging_df.local.errors import BackendError
from healthimaging_df.local.values import ACCOUNT, REGION

__all__ = ["ACTIONS", "PREFIX", "PRINCIPAL", "AccessDenied", "normalize_actions"]

PREFIX = "medical-imaging:"
PRINCIPAL = f"arn:aws:iam::{ACCOUNT}:user/local-healthimaging"
"""The IAM principal the local service's known credentials belong to."""

ACTIONS = frozenset(
    {
        "CopyImageSet",
        "CreateDatastore",
        "DeleteDatastore",
        "DeleteImageSet",
        "GetDatastore",
        "GetDICOMBulkdata",
        "GetDICOMImportJob",
        "GetDICOMInstance",
        "GetDICOMInstanceFrames",
        "GetDICOMInstanceMetadata",
        "GetDICOMSeriesMetadata",
        "GetImageFrame",
        "GetImageSet",
        "GetImageSetMetadata",
        "ListDatastores",
        "ListDICOMImportJobs",
        "ListImageSetVersions",
        "ListTagsForResource",
        "SearchDICOMInstances",
        "SearchDICOMSeries",
        "SearchDICOMStudies",
        "SearchImageSets",
        "StartDICOMImportJob",
        "StoreDICOM",
        "StoreDICOMStudy",
        "TagResource",
        "UntagResource",
        "UpdateImageSetMetadata",
    }
)
"""Every IAM action of ``medical-imaging`` (without the prefix)."""


class AccessDenied(BackendError):
    """The caller's policy does not allow the action (HTTP 403 ``AccessDeniedException``)."""

    code = "AccessDeniedException"
    status = 403

    def __init__(self, action: str, resource: str) -> None:
        super().__init__(
            f"User: {PRINCIPAL} is not authorized to perform: {PREFIX}{action} on resource: "
            f"{resource} with an explicit deny in an identity-based policy"
        )


def normalize_actions(names: Iterable[str]) -> frozenset[str]:
    """The action names without the ``medical-imaging:`` prefix; ``ValueError`` for unknown ones.

    >>> sorted(normalize_actions(["medical-imaging:SearchDICOMStudies", "GetImageSet"]))
    ['GetImageSet', 'SearchDICOMStudies']
    """
    if isinstance(names, str):
        raise ValueError("deny takes a list of action names, not one string")
    out: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise ValueError("an action name must be a string")
        bare = name[len(PREFIX) :] if name.startswith(PREFIX) else name
        if bare not in ACTIONS:
            raise ValueError(
                f"{name!r} is not a medical-imaging IAM action (for example "
                f"{PREFIX}SearchImageSets or SearchDICOMStudies)"
            )
        out.add(bare)
    return frozenset(out)


def resource_arn(datastore_id: str | None, image_set_id: str | None = None) -> str:
    """The ARN an action is checked against: ``*``, a datastore or an image set."""
    if not datastore_id:
        return "*"
    arn = f"arn:aws:medical-imaging:{REGION}:{ACCOUNT}:datastore/{datastore_id}"
    return f"{arn}/imageset/{image_set_id}" if image_set_id else arn
