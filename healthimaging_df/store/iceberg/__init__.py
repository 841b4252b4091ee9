"""Apache Iceberg tables for snapshots, through pyiceberg (the ``[iceberg]`` extra).

``catalog.IcebergTarget`` names a table (``NAMESPACE.TABLE`` in a SQL, Glue or REST catalog);
``table.IcebergFormat`` is the table behind the table-format interface. pyiceberg is imported
when a catalog is first used, so this package imports without it.
"""

from healthimaging_df.store.iceberg.catalog import IcebergTarget, check_identifier, kind_of
from healthimaging_df.store.iceberg.table import IcebergFormat

__all__ = ["IcebergFormat", "IcebergTarget", "check_identifier", "kind_of"]
