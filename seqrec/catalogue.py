"""The optional item catalogue, ``items/*.parquet``: ``item_id``, ``text``, ``available``.

One reader for every stage that uses it (text features for training, availability for scoring);
other columns are kept and ignored by them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from seqrec.storage import Storage


def catalogue_files(storage: Storage) -> list[str]:
    return storage.list_files("items", suffix=".parquet")


def read_catalogue(storage: Storage) -> pa.Table | None:
    """Every catalogue row (files with differing columns combined), or None without a catalogue."""
    files = catalogue_files(storage)
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f, filesystem=storage.filesystem) for f in files],
                            promote_options="permissive")
