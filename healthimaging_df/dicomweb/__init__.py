"""DICOMweb QIDO-RS for HealthImaging: typed study/series/instance frames and series enrichment.

HealthImaging answers QIDO-RS searches (since mid-2025) on the attributes SearchImageSets cannot
filter (Modality, PatientName, StudyDescription, birth date...), up to 1,000 records a request,
and it is not an access: archived image sets stay archived. See ``docs/dicomweb.md``.

>>> from healthimaging_df.dicomweb import query_params
>>> query_params("studies", {"PatientName": "DOE^*"})
{'PatientName': 'DOE^*'}
"""

from __future__ import annotations

try:
    import dicomweb_client as _dicomweb_client  # noqa: F401
    import pydicom as _pydicom  # noqa: F401
except ImportError as _missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        'healthimaging_df.dicomweb needs an optional extra: pip install "healthimaging-df[dicomweb]"'
    ) from _missing

from healthimaging_df.dicomweb._client import (
    QidoClient,
    QidoResult,
    canonical_url,
    dicomweb_endpoint,
    make_qido_client,
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

__all__ = [
    "ATTRS_KEY",
    "COLUMNS",
    "LEVELS",
    "MAX_INCLUDEFIELD",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "OLDER_RECORD_CAP",
    "SEARCH_KEYS",
    "Level",
    "MatchValue",
    "QidoClient",
    "QidoResult",
    "canonical_url",
    "decode_dataset",
    "dicomweb_endpoint",
    "fetch_series_attributes",
    "make_qido_client",
    "query_params",
    "rows_to_frame",
    "search_instances",
    "search_series",
    "search_studies",
]
