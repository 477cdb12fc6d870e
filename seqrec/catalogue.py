"""The optional item catalogue, ``items/*.parquet``: ``item_id``, ``text``, ``available``.

One reader for every stage that uses it (text features for training, availability for scoring
and evaluation); other columns are kept and ignored by them. :func:`unavailable_items` is the one
mask of items never recommended: scoring and evaluation (the promotion gate) both apply it, so the
gate judges the ranking users see.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seqrec.data import Vocabulary
from seqrec.storage import Storage


def catalogue_files(storage: Storage) -> list[str]:
    return storage.list_files("items", suffix=".parquet")


def read_catalogue(storage: Storage) -> pa.Table | None:
    """Every catalogue row (files with differing columns combined), or None without a catalogue."""
    files = catalogue_files(storage)
    if not files:
        return None
    return pa.concat_tables(
        [pq.read_table(f, filesystem=storage.filesystem) for f in files], promote_options="permissive"
    )


def unavailable_items(storage: Storage, vocab: Vocabulary) -> np.ndarray:
    """(N+1,) bool: items never recommended: the catalogue's unavailable ones, and padding."""
    unavailable = np.zeros(vocab.num_items + 1, dtype=bool)
    unavailable[0] = True
    catalogue = read_catalogue(storage)
    if catalogue is not None and "available" in catalogue.column_names:
        off = catalogue.filter(pc.invert(pc.fill_null(catalogue["available"], True)))["item_id"]
        index = vocab.lookup(off)
        unavailable[index[index > 0]] = True
    return unavailable
