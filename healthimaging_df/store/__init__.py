"""Where results are kept: local disk or S3, Parquet files and Delta tables, redaction.

Below the engine: nothing here fetches. ``healthimaging_df.snapshot`` is the public face.
"""
