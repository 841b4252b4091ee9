"""Naming an Iceberg table: ``NAMESPACE.TABLE`` in a catalog given by one URI.

``sqlite:///…`` (or ``postgresql://…``) is a SQL catalog (local work: needs a ``warehouse``),
``glue`` or ``glue://<catalog id>`` the AWS Glue catalog (the session's credentials and region),
``http(s)://…`` an Iceberg REST catalog (S3 Tables' endpoint, Polaris, Lakekeeper...). The same
three arguments name a table everywhere: ``iceberg_table=``, ``catalog=``, ``warehouse=`` in
Python, ``--iceberg-table``, ``--catalog``, ``--warehouse`` on the command line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from healthimaging_df.errors import QueryValidationError

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,254}")


@dataclass(frozen=True)
class IcebergTarget:
    """An Iceberg table: its identifier, its catalog's URI, and how to reach both.

    Attributes
    ----------
    identifier
        ``"namespace.table"`` (a nested namespace is ``"a.b.table"``).
    catalog
        The catalog URI (see the module docstring).
    warehouse
        Where new tables' files go (``file:///…``, a local path, or ``s3://bucket/prefix``);
        the REST catalog's warehouse name for REST.
    properties
        More pyiceberg catalog properties (``s3.endpoint``, ``credential``, ``token``...).
    boto3_session, region, s3_endpoint_url
        Credentials and endpoints for Glue and S3 (the default session when None).
    """

    identifier: str
    catalog: str
    warehouse: str | None = None
    properties: Mapping[str, str] = field(default_factory=dict, repr=False)
    boto3_session: Any = field(default=None, repr=False)
    region: str | None = None
    s3_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        check_identifier(self.identifier)
        if not isinstance(self.catalog, str) or not self.catalog:
            raise QueryValidationError("catalog", "must be a catalog URI")
        if kind_of(self.catalog) == "sql" and self.warehouse is None:
            raise QueryValidationError(
                "warehouse", "a SQL catalog needs one (a folder, file:///... or s3://bucket/prefix)"
            )
        if self.warehouse is not None and (
            not isinstance(self.warehouse, str) or not self.warehouse
        ):
            raise QueryValidationError("warehouse", "must be a URI or a local path")
        if not isinstance(self.properties, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.properties.items()
        ):
            raise QueryValidationError("catalog_properties", "must map property names to strings")

    @property
    def namespace(self) -> str:
        """The namespace (everything before the last dot)."""
        return self.identifier.rpartition(".")[0]

    def load_catalog(self) -> Any:
        """The pyiceberg catalog (``pyiceberg`` is the ``[iceberg]`` extra)."""
        try:
            from pyiceberg.catalog import load_catalog
        except ImportError:
            raise ImportError(
                "Iceberg snapshots need pyiceberg: pip install 'healthimaging-df[iceberg]'"
            ) from None
        kind = kind_of(self.catalog)
        props: dict[str, str] = {}
        warehouse = _warehouse_uri(self.warehouse)
        if warehouse is not None:
            props["warehouse"] = warehouse
        if kind == "sql":
            if warehouse is None:
                raise QueryValidationError(
                    "warehouse", "a SQL catalog needs one (file:///... or s3://bucket/prefix)"
                )
            props.update(type="sql", uri=self.catalog)
        elif kind == "glue":
            props["type"] = "glue"
            identifier = self.catalog.partition("://")[2].strip("/")
            if identifier:
                props["glue.id"] = identifier
        else:
            props.update(type="rest", uri=self.catalog)
        props.update(self._aws_properties(kind))
        props.update(self.properties)
        return load_catalog("healthimaging_df", **props)

    def _aws_properties(self, kind: str) -> dict[str, str]:
        """Credentials, region and endpoints for Glue and S3 from the boto3 session."""
        needs_s3 = kind == "glue" or (self.warehouse or "").startswith("s3://")
        if not needs_s3 and self.boto3_session is None and self.s3_endpoint_url is None:
            return {}
        from healthimaging_df.aws import session as aws_session

        session = aws_session.resolve(self.boto3_session)
        props: dict[str, str] = {}
        region = self.region or session.region_name
        if region:
            props["client.region"] = str(region)
        frozen = aws_session.credentials(session)
        if frozen is not None:
            props["client.access-key-id"] = str(frozen.access_key)
            props["client.secret-access-key"] = str(frozen.secret_key)
            if frozen.token:
                props["client.session-token"] = str(frozen.token)
        if self.s3_endpoint_url:
            props["s3.endpoint"] = self.s3_endpoint_url
            host = urlparse(self.s3_endpoint_url).hostname or ""
            if kind == "glue" and not host.endswith("amazonaws.com"):
                props["glue.endpoint"] = self.s3_endpoint_url  # moto serves both on one port
        return props


def check_identifier(identifier: Any) -> str:
    """``namespace.table`` with parts of letters, digits, ``_`` and ``-``; else a typed error."""
    if not isinstance(identifier, str) or identifier.count(".") < 1:
        raise QueryValidationError("iceberg_table", "must be NAMESPACE.TABLE")
    for part in identifier.split("."):
        if not _PART.fullmatch(part):
            raise QueryValidationError(
                "iceberg_table", "parts must be letters, digits, '_' or '-' (NAMESPACE.TABLE)"
            )
    return identifier


def kind_of(catalog: str) -> str:
    """``"sql"``, ``"glue"`` or ``"rest"`` for a catalog URI; else a typed error."""
    if catalog.startswith(("sqlite:", "postgresql")):
        return "sql"
    if catalog == "glue" or catalog.startswith("glue://"):
        return "glue"
    if urlparse(catalog).scheme in ("http", "https"):
        return "rest"
    raise QueryValidationError(
        "catalog",
        "must be sqlite:///PATH (a SQL catalog), glue or glue://CATALOG_ID (AWS Glue), or "
        "http(s)://... (an Iceberg REST catalog)",
    )


def _warehouse_uri(warehouse: str | None) -> str | None:
    """A local path as a ``file://`` URI; URIs as they are."""
    if warehouse is None or "://" in warehouse:
        return warehouse
    return "file://" + os.path.abspath(warehouse)
