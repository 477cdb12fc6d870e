"""Training rows for the workers: sequences -> fixed-width index rows as Ray datasets.

Leave-one-out: a user's last item is the test target and the second-to-last the validation target;
training rows hold neither (``holdout=2``), validation rows end on the second-to-last item.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import torch

from seqrec.data import Vocabulary, encode, longest
from seqrec.evaluate import evaluation_rows

ENCODE_BATCH_ROWS = 4096


class EncodeSplit:
    """Ray Data batch function: sequences -> fixed-width training rows.

    ``holdout`` newest items are removed first (2 for training). Rows have ``width + 1`` columns
    (inputs and shifted labels); with ``windows`` a longer history gives one row per window
    (:func:`seqrec.data.window_index`). Validation rows come from :func:`seqrec.evaluate.evaluation_rows`.
    """

    def __init__(self, vocab: Vocabulary, width: int, holdout: int, min_len: int = 2, windows: bool = False):
        self.vocab, self.width, self.holdout = vocab, width, holdout
        self.min_len, self.windows = min_len, windows

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        enc = encode(batch, self.vocab, self.width + 1, drop_last=self.holdout, windows=self.windows)
        keep = enc.lengths >= self.min_len
        return {"items": enc.items[keep], "event_types": enc.event_types[keep]}


def next_item_pairs(items: torch.Tensor, types: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal training rows (B, T+1) -> inputs, their types and next-item labels (B, T); 0 = no label."""
    inputs, input_types, labels = items[:, :-1], types[:, :-1], items[:, 1:].clone()
    labels[inputs == 0] = 0               # the first event has no context to predict it from
    return inputs, input_types, labels


def item_counts(sequences: pa.Table, vocab: Vocabulary, holdout: int = 2) -> np.ndarray:
    """Interactions per vocabulary index in the training part (for popularity and log-q)."""
    enc = encode(sequences.select(["item_ids"]), vocab, width=max(longest(sequences), 1), drop_last=holdout)
    return np.bincount(enc.items.ravel(), minlength=vocab.num_items + 1).astype(np.int64)


def make_datasets(sequences: pa.Table, vocab: Vocabulary, max_len: int, num_workers: int,
                  windows: bool = False) -> dict[str, ray.data.Dataset]:
    """``{"train": training rows, "val": validation rows}``, each cut into blocks for every worker."""
    source = ray.data.from_arrow(sequences.select(["item_ids", "event_types"]))
    blocks = max(num_workers * 2, 2)
    training_rows = source.map_batches(EncodeSplit(vocab, max_len, holdout=2, windows=windows),
                                       batch_format="pyarrow", batch_size=ENCODE_BATCH_ROWS)
    validation_rows = source.map_batches(
        evaluation_rows, fn_kwargs={"vocab": vocab, "width": max_len, "holdout": 1,
                                    "seen_width": max(longest(sequences) - 1, 1)},
        batch_format="pyarrow", batch_size=ENCODE_BATCH_ROWS)
    return {"train": training_rows.repartition(blocks).materialize(),
            "val": validation_rows.repartition(blocks).materialize()}
