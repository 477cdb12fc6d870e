"""Foreign readers of the recommendation table, as a user of DuckDB or Polars would open it.

Test-only (``pip install -e .[test]``): DuckDB's ``delta`` and ``httpfs`` extensions come from the
PyPI wheels ``duckdb-extension-delta`` / ``duckdb-extension-httpfs`` and are installed from the
wheel's file, so nothing is downloaded at run time.
"""

from __future__ import annotations

import os

from seqrec.publish import delta_storage_options, table_uri
from seqrec.storage import Storage, s3_endpoint


def duckdb_connection(storage: Storage):
    """A DuckDB connection with ``delta_scan`` loaded and, for an S3 root, a secret for its endpoint."""
    import duckdb
    import duckdb_extensions

    con = duckdb.connect()
    names = ("httpfs", "delta") if storage.is_s3 else ("delta",)
    for name in names:
        duckdb_extensions.import_extension(name, con=con)
        con.sql(f"LOAD {name}")
    if storage.is_s3:
        endpoint = s3_endpoint() or ""
        scheme, _, host = endpoint.partition("://")
        ssl = "true" if scheme == "https" else "false"
        region = os.environ.get("AWS_REGION", "us-east-1")
        con.sql(
            f"CREATE SECRET seqrec (TYPE S3, KEY_ID '{os.environ['AWS_ACCESS_KEY_ID']}', "
            f"SECRET '{os.environ['AWS_SECRET_ACCESS_KEY']}', REGION '{region}', "
            f"ENDPOINT '{host or scheme}', URL_STYLE 'path', USE_SSL {ssl})"
        )
    return con


def duckdb_count(con, storage: Storage, date: str) -> tuple[int, list[str]]:
    """(rows, sorted distinct model versions) of ``date``, read by DuckDB from the Delta log."""
    rows, versions = con.execute(
        "SELECT count(*), list(DISTINCT model_version ORDER BY model_version) "
        f"FROM delta_scan('{table_uri(storage)}') WHERE dt = ?",
        [date],
    ).fetchone()
    return rows, versions or []


def polars_frame(storage: Storage, date: str):
    import polars as pl

    frame = pl.read_delta(table_uri(storage), storage_options=delta_storage_options(storage))
    return frame.filter(pl.col("dt") == date)
