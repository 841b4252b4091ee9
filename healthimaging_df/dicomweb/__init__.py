"""DICOMweb QIDO-RS for HealthImaging: typed study/series/instance frames and series enrichment.

HealthImaging answers QIDO-RS searches (since mid-2025) on the attributes SearchImageSets cannot
filter (Modality, PatientName, StudyDescription, birth date...), up to 1,000 records a request,
and it is not an access: archived image sets stay archived. See ``docs/dicomweb.md``.

Where DICOMweb lives (:func:`resolve_endpoint`) needs nothing optional; everything else needs the
``dicomweb`` extra and loads on first use.

>>> from healthimaging_df.dicomweb import query_params
>>> query_params("studies", {"PatientName": "DOE^*"})
{'PatientName': 'DOE^*'}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from healthimaging_df.dicomweb._endpoint import ENV_VAR, Endpoint, resolve_endpoint

if TYPE_CHECKING:
    from healthimaging_df.dicomweb._client import (
        QidoClient,
        QidoResult,
        canonical_url,
        check_page,
        dicomweb_endpoint,
        make_qido_client,
        unavailable,
    )
    from healthimaging_df.dicomweb._frames import (
        ATTRS_KEY,
        fetch_series_attributes,
        search_instances,
        search_series,
        search_studies,
    )
    from healthimaging_df.dicomweb._model import (
        COLUMNS,
        LEVELS,
        MAX_INCLUDEFIELD,
        MAX_LIMIT,
        MAX_OFFSET,
        OLDER_RECORD_CAP,
        SEARCH_KEYS,
        Level,
        MatchValue,
        decode_dataset,
        query_params,
        rows_to_frame,
    )

_HOMES = {
    "QidoClient": "_client",
    "QidoResult": "_client",
    "canonical_url": "_client",
    "check_page": "_client",
    "dicomweb_endpoint": "_client",
    "make_qido_client": "_client",
    "unavailable": "_client",
    "ATTRS_KEY": "_frames",
    "fetch_series_attributes": "_frames",
    "search_instances": "_frames",
    "search_series": "_frames",
    "search_studies": "_frames",
    "COLUMNS": "_model",
    "LEVELS": "_model",
    "MAX_INCLUDEFIELD": "_model",
    "MAX_LIMIT": "_model",
    "MAX_OFFSET": "_model",
    "OLDER_RECORD_CAP": "_model",
    "SEARCH_KEYS": "_model",
    "Level": "_model",
    "MatchValue": "_model",
    "decode_dataset": "_model",
    "query_params": "_model",
    "rows_to_frame": "_model",
}
EXTRA_HINT = (
    'healthimaging_df.dicomweb needs an optional extra: pip install "healthimaging-df[dicomweb]"'
)


def installed() -> bool:
    """Whether the ``dicomweb`` extra (dicomweb-client, pydicom, requests) is importable."""
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("dicomweb_client", "pydicom", "requests"))


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not installed():
        raise ImportError(EXTRA_HINT)
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ATTRS_KEY",
    "COLUMNS",
    "ENV_VAR",
    "LEVELS",
    "MAX_INCLUDEFIELD",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "OLDER_RECORD_CAP",
    "SEARCH_KEYS",
    "Endpoint",
    "Level",
    "MatchValue",
    "QidoClient",
    "QidoResult",
    "canonical_url",
    "check_page",
    "decode_dataset",
    "dicomweb_endpoint",
    "fetch_series_attributes",
    "installed",
    "make_qido_client",
    "query_params",
    "resolve_endpoint",
    "rows_to_frame",
    "search_instances",
    "search_series",
    "search_studies",
    "unavailable",
]
