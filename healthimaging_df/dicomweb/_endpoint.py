"""Where DICOMweb lives for a ``medical-imaging`` client: pure, and free of the optional extra.

AWS serves DICOMweb only at ``https://dicom-medical-imaging.{region}.amazonaws.com`` (the API's
``runtime-`` host answers 404 for DICOMweb paths). So the address is, in order:

1. the ``dicomweb_endpoint_url`` argument (or the CLI's ``--dicomweb-endpoint-url``);
2. the environment variable ``AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING`` (in the style of
   botocore's ``AWS_ENDPOINT_URL_<SERVICE>``; the local service advertises its DICOMweb port so);
3. derived from the region, when the client talks to AWS's own endpoint
   (``[runtime-]medical-imaging[-fips].{region}.amazonaws.com[.cn]`` or its dual-stack name);
4. unknown otherwise: a custom ``endpoint_url`` (a VPC endpoint's own DNS name, a proxy, a
   stand-in) says nothing about where DICOMweb is, so QIDO-RS is not weighed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from healthimaging_df.errors import QueryValidationError

ENV_VAR = "AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING"
_AWS_HOST = re.compile(
    r"(?:runtime-)?medical-imaging(?:-fips)?\.(?P<region>[a-z0-9-]+)\."
    r"(?P<suffix>amazonaws\.com(?:\.cn)?|api\.aws)"
)
Source = Literal["argument", "environment", "derived", "unknown"]


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb base URL and where it came from (``url`` None: unknown, see ``why``)."""

    url: str | None
    source: Source
    why: str | None = None

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, {self.source})"


def resolve_endpoint(
    client: Any = None, region: str | None = None, dicomweb_endpoint_url: str | None = None
) -> Endpoint:
    """The DICOMweb endpoint for *client* (or *region*): argument > environment > AWS > unknown.

    >>> resolve_endpoint(region="eu-west-1").url
    'https://dicom-medical-imaging.eu-west-1.amazonaws.com'
    >>> resolve_endpoint(region="eu-west-1", dicomweb_endpoint_url="https://vpce.example/").url
    'https://vpce.example'
    """
    if dicomweb_endpoint_url:
        return Endpoint(_check(dicomweb_endpoint_url, "dicomweb_endpoint_url"), "argument")
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Endpoint(_check(configured, ENV_VAR), "environment")
    meta = getattr(client, "meta", None)
    region = region or getattr(meta, "region_name", None)
    endpoint = getattr(meta, "endpoint_url", None)
    if isinstance(endpoint, str):
        found = _AWS_HOST.fullmatch(urlsplit(endpoint).hostname or "")
        if found is None:
            return Endpoint(
                None,
                "unknown",
                "a custom endpoint_url gives no DICOMweb address: pass dicomweb_endpoint_url "
                f"or set {ENV_VAR}",
            )
        region = found["region"]
        suffix = ".amazonaws.com.cn" if found["suffix"].endswith(".cn") else ".amazonaws.com"
        return Endpoint(f"https://dicom-medical-imaging.{region}{suffix}", "derived")
    if not region:
        return Endpoint(None, "unknown", "no AWS region: set one on the boto3 session")
    return Endpoint(f"https://dicom-medical-imaging.{region}.amazonaws.com", "derived")


def _check(url: str, field: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise QueryValidationError(field, "must be an http(s) URL without a query or fragment")
    return url.rstrip("/")
