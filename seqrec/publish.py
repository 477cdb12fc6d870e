"""Stage 5: atomic, date-partitioned publishing.

A partition ``<table>/dt=YYYY-MM-DD/`` exists for readers only once its ``_SUCCESS`` manifest does.
Publishing therefore (1) deletes ``_SUCCESS`` (the night disappears for readers), (2) deletes
whatever part files an earlier or crashed run left, (3) writes the new part files, (4) counts them,
and (5) writes ``_SUCCESS`` last, naming every part file and the row count. Object stores have no
directory rename, but a single-object PUT is atomic, so this order gives readers either the whole
night or nothing, on S3 and locally alike. :func:`read_partition` is the reader's side of it.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from seqrec.storage import Storage, retry

log = logging.getLogger("seqrec.publish")

SUCCESS = "_SUCCESS"


def publish_partition(storage: Storage, table: str, date: str, write: Callable[[str], None],
                      manifest: dict[str, Any]) -> dict[str, Any]:
    """Replace ``table/dt=date`` with what ``write(directory)`` produces; returns the manifest."""
    partition = ("/".join((table, f"dt={date}")),)
    storage.delete_file(*partition, SUCCESS)
    storage.delete_dir(*partition)
    write(storage.path(*partition))
    files = storage.list_files(*partition, suffix=".parquet")
    rows = sum(retry(lambda f=f: pq.read_metadata(f, filesystem=storage.filesystem).num_rows, what=f"stat {f}")
               for f in files)
    manifest = {**manifest, "rows": rows, "files": [f.rsplit("/", 1)[1] for f in files],
                "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.write_json(manifest, *partition, SUCCESS)
    log.info("published %s: %d rows in %d files", storage.uri(*partition), rows, len(files))
    return manifest


def read_partition(storage: Storage, table: str, date: str) -> pa.Table | None:
    """The published partition, or None when it is absent or incomplete (no ``_SUCCESS``)."""
    partition = "/".join((table, f"dt={date}"))
    if not storage.exists(partition, SUCCESS):
        return None
    manifest = storage.read_json(partition, SUCCESS)
    parts = [storage.read_table(partition, name) for name in manifest["files"]]
    return pa.concat_tables(parts) if parts else None


def published_dates(storage: Storage, table: str) -> list[str]:
    return [d.removeprefix("dt=") for d in storage.list_dirs(table)
            if d.startswith("dt=") and storage.exists(table, d, SUCCESS)]
