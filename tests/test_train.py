"""Warm starts (the vocabulary grows, known items keep their rows, new ones start from text); the schedule."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from seqrec.artifact import Artifact
from seqrec.config import ModelConfig
from seqrec.data import Vocabulary
from seqrec.training.loop import lr_factor
from seqrec.training.warm_start import initial_model

MODEL = ModelConfig(hidden_size=16, num_layers=1, num_heads=1, max_len=8, dropout=0.0)


def _parent() -> Artifact:
    vocab = Vocabulary(items=pa.array([10, 20, 30], pa.int64()), event_types=["view", "click"])
    return Artifact(version="v1", model=initial_model(vocab, MODEL, None, None), vocab=vocab)


def test_warm_start_keeps_known_rows_and_appends_new_items():
    parent = _parent()
    grown = parent.vocab.extend(pa.array([40, 10, 5], pa.int64()))
    assert grown.items.to_pylist() == [10, 20, 30, 5, 40]          # known indices unchanged
    model = initial_model(grown, MODEL, parent, None)
    old = parent.model.item_embedding.weight
    new = model.item_embedding.weight
    assert new.shape[0] == grown.num_items + 2
    torch.testing.assert_close(new[:4], old[:4])                      # padding + the 3 known items
    torch.testing.assert_close(new[-1], old[-1])                      # [MASK]
    for name, value in parent.model.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], value)


def test_new_items_start_from_their_text():
    parent = _parent()
    grown = parent.vocab.extend(pa.array([40], pa.int64()))
    text = torch.randn(grown.num_items + 2, 8)
    model = initial_model(grown, MODEL, parent, text)
    assert torch.count_nonzero(model.item_embedding.weight[4]) == 0  # id part zero: text alone
    expected = model.text_projection(text[4])
    torch.testing.assert_close(model.item_table()[4], expected)


def test_other_architecture_trains_from_scratch():
    parent = _parent()
    other = ModelConfig(hidden_size=32, num_layers=1, num_heads=1, max_len=8)
    model = initial_model(parent.vocab, other, parent, None)
    assert model.config.hidden_size == 32


def test_a_promoted_model_with_another_ensemble_size_is_not_warm_started_from():
    from dataclasses import replace

    parent = _parent()
    model = initial_model(parent.vocab, replace(MODEL, members=2), parent, None)
    assert (model.config.members, model.item_table().shape[1]) == (2, 32)
    assert not torch.equal(model.backbone.state_dict()["h.0.attn.c_attn.weight"],
                           parent.model.backbone.state_dict()["h.0.attn.c_attn.weight"])


def test_items_never_trained_on_start_from_text_and_stay_out_of_the_softmax():
    import numpy as np

    from seqrec.losses import full_ce
    from seqrec.training.cold_items import never_trained

    vocab = Vocabulary(items=pa.array([10, 20, 30], pa.int64()), event_types=["view"],
                       counts=np.array([0, 5, 0, 2]))                 # item 20 (index 2) never in training
    assert never_trained(vocab.counts).tolist() == [True, False, True, False]
    text = torch.randn(vocab.num_items + 2, 8)
    model = initial_model(vocab, MODEL, None, text)
    weight = model.item_embedding.weight
    assert torch.count_nonzero(weight[2]) == 0 and torch.count_nonzero(weight[1]) > 0
    assert torch.count_nonzero(weight[-1]) > 0                        # [MASK] untouched
    without_text = initial_model(vocab, MODEL, None, None)
    assert torch.count_nonzero(without_text.item_embedding.weight[2]) > 0   # id-only: ordinary init

    # In the loss, an excluded item gets no gradient however high it scores.
    hidden = torch.randn(6, 16, requires_grad=True)
    table = model.item_table().detach()[: vocab.num_items + 1].clone().requires_grad_(True)
    labels = torch.tensor([1, 3, 1, 3, 1, 3])
    excluded = torch.from_numpy(never_trained(vocab.counts))
    loss = full_ce(hidden, labels, table, excluded=excluded)
    loss.backward()
    assert table.grad[2].abs().max() == 0 and table.grad[1].abs().max() > 0
    logits = hidden.detach() @ table.detach()[[1, 3]].T
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, (labels == 3).long()))


def test_only_items_without_an_id_row_are_placed_from_text():
    """Quiet tonight but learned before (a warm start kept the row): left alone; new: placed."""
    import numpy as np

    from seqrec.training.cold_items import without_id_rows

    parent = _parent()
    grown = parent.vocab.extend(pa.array([40], pa.int64()))
    grown.counts = np.array([0, 3, 0, 1, 0])                          # 20 quiet tonight, 40 new
    model = initial_model(grown, MODEL, parent, torch.randn(grown.num_items + 2, 8))
    assert without_id_rows(model, grown.counts).tolist() == [True, False, False, False, True]


def test_learning_rate_warms_up_then_decays_to_zero_on_a_cosine():
    factors = [lr_factor(step, warmup=2, total=10, schedule="cosine") for step in range(12)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and factors[6] == pytest.approx(0.5) and factors[10:] == [0.0, 0.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))                      # never rises again
    assert [lr_factor(step, 2, 10, "constant") for step in (0, 5, 50)] == [0.5, 1.0, 1.0]
