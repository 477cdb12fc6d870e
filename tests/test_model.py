"""seqrec.model: shapes, padding, causality, save/load round trips and a tiny overfit per loss."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from seqrec.artifact import Artifact, read_local, write_local
from seqrec.config import TrainConfig
from seqrec.data import Vocabulary
from seqrec.losses import LOSSES
from seqrec.model import KINDS, SeqRecConfig, SeqRecModel, build_model
from seqrec.training.loop import training_step_loss

NUM_ITEMS, HIDDEN, WIDTH = 20, 16, 8
TYPES = ["view", "click", "cart"]


def tiny(kind: str, text_dim: int = 0, dropout: float = 0.0, seed: int = 0) -> SeqRecModel:
    torch.manual_seed(seed)
    return build_model(
        NUM_ITEMS,
        kind=kind,
        hidden_size=HIDDEN,
        num_layers=2,
        num_heads=2,
        max_len=WIDTH,
        dropout=dropout,
        num_event_types=len(TYPES),
        text_dim=text_dim,
    )


# Left-padded rows: a short history, an empty row, a full row.
ITEMS = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5], [0, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
TYPES_IN = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 2, 2, 2, 3, 3]])


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes_and_no_nan_with_left_padding(kind):
    model = tiny(kind, text_dim=4).eval()
    hidden = model(ITEMS, TYPES_IN).hidden
    assert hidden.shape == (3, WIDTH, HIDDEN)
    assert torch.isfinite(hidden).all()
    users = model.user_vectors(ITEMS, TYPES_IN)
    assert users.shape == (3, HIDDEN)
    torch.testing.assert_close(users, hidden[:, -1])
    assert model.item_table().shape == (NUM_ITEMS + 2, HIDDEN)  # padding, items, [MASK]
    assert model(ITEMS).hidden.shape == (3, WIDTH, HIDDEN)  # event types are optional


@pytest.mark.parametrize("kind", KINDS)
def test_rows_do_not_influence_each_other(kind):
    model = tiny(kind).eval()
    together = model(ITEMS, TYPES_IN).hidden
    alone = model(ITEMS[:1], TYPES_IN[:1]).hidden
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-5)


def test_causal_state_ignores_later_items():
    model = tiny("causal").eval()
    changed = ITEMS.clone()
    changed[:, -1] = 11  # a different newest item
    changed[2, 5] = 12  # and, for row 2, an earlier one too
    before, after = model(ITEMS, TYPES_IN).hidden, model(changed, TYPES_IN).hidden
    torch.testing.assert_close(before[0, :-1], after[0, :-1])
    torch.testing.assert_close(before[2, :5], after[2, :5])
    assert (before[0, -1] - after[0, -1]).abs().max() > 1e-3
    assert (before[2, 5:] - after[2, 5:]).abs().amax(-1).min() > 1e-3


def test_bidirectional_state_depends_on_later_items():
    model = tiny("bidirectional").eval()
    changed = ITEMS.clone()
    changed[:, -1] = 11
    before, after = model(ITEMS, TYPES_IN).hidden, model(changed, TYPES_IN).hidden
    assert (before[0, 5] - after[0, 5]).abs().max() > 1e-4  # an earlier real position sees the change
    assert (before[2, 0] - after[2, 0]).abs().max() > 1e-4


def test_padding_content_is_ignored():
    """Padded positions are masked: what sits there must not change real positions."""
    for kind in KINDS:
        model = tiny(kind).eval()
        noisy_types = TYPES_IN.clone()
        noisy_types[0, :5] = 2
        torch.testing.assert_close(
            model(ITEMS, TYPES_IN).hidden[0, 5:], model(ITEMS, noisy_types).hidden[0, 5:]
        )


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        SeqRecConfig(num_items=3, kind="recurrent")


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip_is_exact(kind, tmp_path):
    model = tiny(kind, text_dim=6, dropout=0.1).eval()
    with torch.no_grad():
        model.text_features.copy_(torch.randn(NUM_ITEMS + 2, 6))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = SeqRecModel.from_pretrained(tmp_path).eval()
    assert loaded.config.kind == kind
    assert (loaded.config.num_items, loaded.config.text_dim, loaded.config.num_event_types) == (
        NUM_ITEMS,
        6,
        3,
    )
    original, restored = model.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert torch.equal(model.user_vectors(ITEMS, TYPES_IN), loaded.user_vectors(ITEMS, TYPES_IN))
    assert torch.equal(model.item_table(), loaded.item_table())


@pytest.mark.parametrize("kind", KINDS)
def test_artifact_round_trip(kind, tmp_path):
    model = tiny(kind, text_dim=3).eval()
    with torch.no_grad():
        model.text_features.copy_(torch.randn(NUM_ITEMS + 2, 3))
    vocab = Vocabulary.build(pa.array([f"item-{i:02d}" for i in range(NUM_ITEMS)]), TYPES)
    write_local(Artifact(version="v1", model=model, vocab=vocab, metrics={"val": 1}), tmp_path / "v1")
    artifact = read_local(tmp_path / "v1")
    assert artifact.version == "v1"
    assert artifact.vocab.event_types == TYPES
    assert artifact.vocab.items.to_pylist() == vocab.items.to_pylist()
    assert not artifact.model.training
    assert torch.equal(artifact.model.user_vectors(ITEMS, TYPES_IN), model.user_vectors(ITEMS, TYPES_IN))


# --------------------------------------------------------------------------------------------
# A tiny overfit task through the real training step
# --------------------------------------------------------------------------------------------
def overfit_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) left-padded rows following a fixed cycle, so every next item is predictable."""
    g = torch.Generator().manual_seed(0)
    rows, types = [], []
    for b in range(16):
        length = int(torch.randint(3, WIDTH + 2, (1,), generator=g))
        start = int(torch.randint(1, NUM_ITEMS + 1, (1,), generator=g))
        seq = [(start + 3 * i - 1) % NUM_ITEMS + 1 for i in range(length)]
        rows.append([0] * (WIDTH + 1 - length) + seq)
        types.append([0] * (WIDTH + 1 - length) + [1 + (i % 3) for i in range(length)])
    return torch.tensor(rows), torch.tensor(types)


def uniform_log_q() -> torch.Tensor:
    log_q = torch.full((NUM_ITEMS + 1,), -torch.log(torch.tensor(float(NUM_ITEMS))).item())
    log_q[0] = float("-inf")
    return log_q


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", KINDS)
def test_training_step_reduces_the_loss(kind, loss):
    torch.set_num_threads(1)
    model = tiny(kind)
    items, types = overfit_batch()
    config = TrainConfig(loss=loss, num_negatives=8, mask_prob=0.3, gbce_t=0.75)
    log_q = uniform_log_q() if loss == "sampled" else None

    def measured() -> float:
        values = []
        for seed in range(4):  # the same masks and negatives for every measurement
            torch.manual_seed(100 + seed)
            with torch.no_grad():
                values.append(training_step_loss(model, model, items, types, config, log_q).item())
        return sum(values) / len(values)

    before = measured()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    # 30 steps: with scaled item embeddings (the production default) masked-item training with a
    # sampled softmax needs more than 20 steps to move clearly.
    for step in range(30):
        torch.manual_seed(step)
        optimizer.zero_grad()
        value = training_step_loss(model, model, items, types, config, log_q)
        assert torch.isfinite(value)
        value.backward()
        optimizer.step()
    model.eval()
    after = measured()
    # Masked-item training learns more slowly than next-item training; both must clearly move.
    assert after < 0.9 * before, (before, after)
    if kind == "causal" and loss == "ce":
        assert after < 0.5 * before, (before, after)


def member(ensemble: SeqRecModel, m: int) -> SeqRecModel:
    """Member ``m`` of an ensemble as a model of its own (its slices of the shared tables, its backbone)."""
    config = ensemble.config
    single = SeqRecModel(SeqRecConfig(**{**config.to_dict(), "members": 1})).eval()
    h, state = config.hidden_size, {}
    for key, value in ensemble.state_dict().items():
        if key.startswith("member_backbones."):
            index, rest = key.split(".", 2)[1:]
            if int(index) == m - 1:
                state["backbone." + rest] = value
        elif key.startswith("backbone."):
            if m == 0:
                state[key] = value
        elif key == "text_projection.weight":
            state[key] = value[m * h : (m + 1) * h]
        elif key == "text_features":
            state[key] = value
        else:  # item and event tables
            state[key] = value[:, m * h : (m + 1) * h]
    single.load_state_dict(state)
    return single


@pytest.mark.parametrize("kind", KINDS)
def test_an_ensemble_scores_by_the_sum_of_its_independently_trained_members(kind):
    torch.manual_seed(0)
    ensemble = build_model(
        NUM_ITEMS,
        kind=kind,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        max_len=WIDTH,
        dropout=0.0,
        num_event_types=len(TYPES),
        text_dim=4,
        members=3,
    ).eval()
    with torch.no_grad():
        ensemble.text_features.copy_(torch.randn(NUM_ITEMS + 2, 4))
    members = [member(ensemble, m) for m in range(3)]
    assert not torch.allclose(members[0].item_table(), members[1].item_table())  # seeded apart
    scores = ensemble.user_vectors(ITEMS, TYPES_IN) @ ensemble.item_table().T
    expected = sum(m.user_vectors(ITEMS, TYPES_IN) @ m.item_table().T for m in members)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # Training: the sum of the members' own losses, so no member's gradient depends on another.
    items, types = overfit_batch()
    config = TrainConfig(loss="ce", mask_prob=0.3)
    torch.manual_seed(1)
    loss = training_step_loss(ensemble, ensemble, items, types, config, None)
    separate = []
    for m in members:
        torch.manual_seed(1)  # the same masks
        separate.append(training_step_loss(m, m, items, types, config, None))
    torch.testing.assert_close(loss, sum(separate), rtol=1e-5, atol=1e-5)


def test_an_ensemble_round_trips_through_save_pretrained(tmp_path):
    model = build_model(NUM_ITEMS, hidden_size=8, num_layers=1, max_len=WIDTH, dropout=0.0, members=2).eval()
    model.save_pretrained(tmp_path)
    loaded = SeqRecModel.from_pretrained(tmp_path).eval()
    assert loaded.config.members == 2 and loaded.config.width == 16
    assert torch.equal(model.user_vectors(ITEMS), loaded.user_vectors(ITEMS))


def test_causal_training_ignores_the_first_event_and_padding():
    """Only positions with context predict: a one-event row contributes no label, and no NaN."""
    model = tiny("causal")
    items = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 7], [0, 0, 0, 0, 0, 0, 0, 3, 4]])
    types = torch.ones_like(items) * (items > 0)
    loss = training_step_loss(model, model, items, types, TrainConfig(loss="ce"), None)
    assert torch.isfinite(loss)
    # The loss equals CE of predicting 4 from the state after 3, alone.
    with torch.no_grad():
        hidden = model(items[1:, :-1], types[1:, :-1]).hidden[0, -1]
        logits = model.item_table()[: NUM_ITEMS + 1] @ hidden
        logits[0] = float("-inf")
        expected = torch.nn.functional.cross_entropy(logits[None], torch.tensor([4]))
    torch.testing.assert_close(loss.detach(), expected)


def test_scaled_embeddings_multiply_the_item_signal_only():
    import math

    torch.manual_seed(0)
    plain = build_model(10, hidden_size=16, num_layers=1, max_len=6, dropout=0.0, scale_embeddings=False)
    scaled = build_model(10, hidden_size=16, num_layers=1, max_len=6, dropout=0.0)
    assert scaled.config.scale_embeddings  # what a night builds
    scaled.load_state_dict(plain.state_dict())
    items = torch.tensor([[0, 0, 3, 4, 5, 6]])
    seen = {}
    for name, model in (("plain", plain), ("scaled", scaled)):
        model.eval()
        model.backbone.register_forward_pre_hook(
            lambda m, a, kw, name=name: seen.__setitem__(name, kw["inputs_embeds"]), with_kwargs=True
        )
        model(items)
    torch.testing.assert_close(seen["scaled"], seen["plain"] * math.sqrt(16))


@pytest.mark.parametrize("id_dropout, ids_learn", [(0.0, True), (1.0, False)])
def test_id_dropout_makes_the_text_projection_carry_items(id_dropout, ids_learn):
    """With every id dropped, items are their text alone: the id table gets no gradient, the
    projection does; without id dropout both learn. Id-only models ignore the setting."""
    torch.manual_seed(0)
    model = build_model(NUM_ITEMS, hidden_size=16, num_layers=1, max_len=8, dropout=0.0, text_dim=12)
    model.text_features.normal_()
    items, types = overfit_batch()
    loss = training_step_loss(model, model, items, types, TrainConfig(loss="ce", id_dropout=id_dropout), None)
    loss.backward()
    id_grad = model.item_embedding.weight.grad[1 : NUM_ITEMS + 1].abs().sum()
    assert (id_grad > 0) == ids_learn
    assert model.text_projection.weight.grad.abs().sum() > 0

    plain = tiny("causal")
    loss = training_step_loss(plain, plain, items, types, TrainConfig(loss="ce", id_dropout=1.0), None)
    loss.backward()
    assert plain.item_embedding.weight.grad[1 : NUM_ITEMS + 1].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_items_are_placed_from_their_text(kind):
    """The learned placement lowers its own loss and writes only the untrained items' id rows."""
    import numpy as np

    from seqrec.training.cold_items import place_untrained_items

    torch.manual_seed(0)
    n = 40
    model = build_model(n, kind=kind, hidden_size=16, num_layers=1, max_len=8, dropout=0.0, text_dim=12)
    model.text_features.normal_()
    rows = torch.randint(1, n + 1, (64, 9))
    rows[:, :2] = 0  # left padding
    untrained = np.zeros(n + 1, dtype=bool)
    untrained[0] = True
    untrained[[5, 17, 33]] = True
    rows[torch.isin(rows, torch.tensor([5, 17, 33]))] = 7  # untrained: in no training row
    with torch.no_grad():
        model.item_embedding.weight[[5, 17, 33]] = 0.0
    before = model.item_embedding.weight.detach().clone()

    fit = place_untrained_items(
        model, rows.numpy(), torch.zeros_like(rows).numpy(), untrained, epochs=20, batch_size=64, lr=1e-2
    )

    after = model.item_embedding.weight.detach()
    assert fit["items"] == 3 and fit["loss_after"] < fit["loss_before"]
    assert torch.count_nonzero(after[[5, 17, 33]]) > 0
    trained = torch.from_numpy(~untrained)
    assert torch.equal(after[: n + 1][trained], before[: n + 1][trained])
    assert torch.equal(after[0], before[0]) and torch.equal(after[n + 1 :], before[n + 1 :])


def test_the_model_is_built_from_model_config_with_its_defaults():
    """One source of truth: a model built in code has every architecture default of ModelConfig."""
    from dataclasses import fields

    from seqrec.config import ModelConfig

    defaults = ModelConfig()
    built = SeqRecConfig.from_model_config(
        defaults, num_items=5, num_event_types=3, event_types=["a", "b", "c"]
    )
    bare = SeqRecConfig(num_items=5)
    for name in (f.name for f in fields(ModelConfig) if f.name != "use_event_types"):
        assert getattr(built, name) == getattr(defaults, name) == getattr(bare, name), name
    assert built.num_event_types == 3 and built.event_types == ["a", "b", "c"]
    assert build_model(5, num_event_types=3).config.to_dict() == {**built.to_dict(), "event_types": []}
    no_types = SeqRecConfig.from_model_config(
        ModelConfig(use_event_types=False), num_items=5, num_event_types=3
    )
    assert no_types.num_event_types == 0


def test_an_artifact_config_written_before_a_field_existed_loads_as_it_was_built(tmp_path):
    import json

    model = build_model(NUM_ITEMS, hidden_size=8, num_layers=1, max_len=WIDTH, dropout=0.0)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["scale_embeddings"] is True and written["members"] == 1
    for name in SeqRecConfig.ADDED_LATER:
        del written[name]
    (tmp_path / "config.json").write_text(json.dumps(written))
    loaded = SeqRecModel.from_pretrained(tmp_path, use_safetensors=True)
    assert loaded.config.scale_embeddings is False and loaded.config.members == 1


@pytest.mark.parametrize("kind", KINDS)
def test_the_contrastive_term_adds_to_the_item_loss_and_trains_the_encoder(kind):
    """With train.contrastive_weight the batch goes through the encoder twice (two dropout draws)
    and the InfoNCE term is added: with the same seeds (the same dropout draws) a larger weight adds
    a larger positive amount, and the gradients stay finite."""
    items, types = overfit_batch()
    losses = {}
    for weight in (0.0, 0.5, 1.0, 2.0):
        model = tiny(kind, dropout=0.3)
        torch.manual_seed(1)
        config = TrainConfig(loss="ce", mask_prob=0.5, contrastive_weight=weight)
        loss = training_step_loss(model, model, items, types, config, None)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[weight] = loss.item()
    half_the_term = losses[1.0] - losses[0.5]
    assert half_the_term > 0
    assert losses[2.0] - losses[1.0] == pytest.approx(2 * half_the_term, rel=1e-3)
