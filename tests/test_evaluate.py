"""A user's whole history is excluded from rankings, also where it is longer than the model's context.

The literature's protocol (SASRec's and SASRec+'s reference code) masks every item the user has
interacted with, and the recommendation table promises the same: so evaluation, training-time
validation and nightly scoring all pass the full stored history to the shared ranking function,
while the model reads only its newest ``max_len`` items.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
import torch

from seqrec.artifact import Artifact, save
from seqrec.config import EvalConfig
from seqrec.data import Vocabulary
from seqrec.evaluate import evaluate, evaluation_rows, popularity_metrics, split_batches
from seqrec.model import build_model
from seqrec.score import Recommender
from seqrec.storage import Storage

NUM_ITEMS = 12
WIDTH = 3          # the model's context: much shorter than the histories below


def vocabulary() -> Vocabulary:
    vocab = Vocabulary.build(pa.array(np.arange(1, NUM_ITEMS + 1), pa.int64()), ["interaction"])
    vocab.counts = np.concatenate([[0], np.arange(NUM_ITEMS, 0, -1)]).astype(np.int64)   # item 1 most popular
    return vocab


def long_histories(users: int = 20, seed: int = 0) -> pa.Table:
    """Each user has seen every item but two; their order (and so the target) is random."""
    rng = np.random.default_rng(seed)
    sequences = [list(rng.permutation(np.arange(1, NUM_ITEMS + 1))[: NUM_ITEMS - 1]) for _ in range(users)]
    return pa.table({"user_id": np.arange(users), "item_ids": pa.array(sequences, pa.list_(pa.int64())),
                     "event_types": pa.array([["interaction"] * len(s) for s in sequences], pa.list_(pa.string()))})


def tiny_model():
    torch.manual_seed(0)
    return build_model(NUM_ITEMS, hidden_size=8, num_layers=1, num_heads=2, max_len=WIDTH, dropout=0.0,
                       num_event_types=1).eval()


def test_popularity_ranks_the_target_among_unseen_items_only():
    # test target 5, history 1 2 3 6: the window (3 6) alone would leave items 1 and 2 above 5.
    sequences = pa.table({"item_ids": pa.array([[1, 2, 3, 6, 5]], pa.list_(pa.int64()))})
    totals = popularity_metrics(split_batches(sequences, vocabulary(), width=2, holdout=0, batch_size=8),
                                vocabulary(), ks=[1, 2])
    assert totals["mrr"] == pytest.approx(1 / 2)             # only item 4 (more popular, unseen) is above it
    val = popularity_metrics(split_batches(sequences, vocabulary(), width=2, holdout=1, batch_size=8),
                             vocabulary(), ks=[1])
    assert val["mrr"] == pytest.approx(1 / 3)                # target 6 among 4, 5, 6


def test_model_evaluation_excludes_the_whole_history():
    # Besides the target, one item is unseen before the test target and two before the validation
    # target (the never-seen one and the test item), so any model ranks the target within 2 or 3.
    metrics = evaluate(tiny_model(), vocabulary(), long_histories(), EvalConfig(ks=[2, 3], batch_size=7))
    for split, k in (("val", 3), ("test", 2)):
        assert metrics[split]["users"] == 20
        assert metrics[split]["model"][f"hr@{k}"] == 1.0
        assert metrics[split]["popularity"][f"hr@{k}"] == 1.0
    assert metrics["val"]["model"]["hr@2"] < 1.0                       # not trivially everything


def test_training_validation_rows_carry_the_whole_history():
    sequences = long_histories(users=4)
    rows = evaluation_rows(sequences, vocabulary(), WIDTH, holdout=1, seen_width=NUM_ITEMS)
    assert rows["items"].shape == (4, WIDTH + 1)
    for row, seen, items in zip(rows["items"], rows["seen"], sequences["item_ids"].to_pylist()):
        assert row[-1] == items[-2]                                        # validation target
        assert sorted(seen[seen > 0].tolist()) == sorted(items[:-2])       # all of the history before it


def test_scoring_never_recommends_an_item_seen_before_the_models_context(tmp_path):
    storage = Storage(str(tmp_path))
    vocab = vocabulary()
    save(storage, Artifact(version="v1", model=tiny_model(), vocab=vocab, metrics={}, manifest={}))
    recommender = Recommender(str(tmp_path), "v1", k=NUM_ITEMS, never_recommend=np.zeros(NUM_ITEMS + 1, dtype=bool),
                              generated_at=dt.datetime.now(dt.timezone.utc))
    sequences = long_histories(users=5, seed=1)
    out = recommender(sequences)
    for items, recommended in zip(sequences["item_ids"].to_pylist(), out["items"].to_pylist()):
        assert sorted(recommended) == sorted(set(range(1, NUM_ITEMS + 1)) - set(items))   # the one unseen item
