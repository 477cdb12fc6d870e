"""seqrec.losses: full softmax, sampled softmax with log-q correction, gSASRec's gBCE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqrec.losses import LOSSES, contrastive, full_ce, gbce, item_loss, sampled_ce

NUM_ITEMS, HIDDEN, POSITIONS = 30, 8, 12


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(POSITIONS, HIDDEN, generator=g, requires_grad=True)
    items = torch.randn(NUM_ITEMS + 1, HIDDEN, generator=g, requires_grad=True)  # row 0: padding
    labels = torch.randint(1, NUM_ITEMS + 1, (POSITIONS,), generator=g)
    return hidden, labels, items


def uniform_log_q() -> torch.Tensor:
    log_q = torch.full((NUM_ITEMS + 1,), -torch.log(torch.tensor(float(NUM_ITEMS))).item())
    log_q[0] = float("-inf")
    return log_q


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_is_a_finite_scalar_with_gradients(name):
    torch.manual_seed(0)
    hidden, labels, items = inputs()
    loss = item_loss(name, hidden, labels, items, log_q=uniform_log_q(), num_negatives=16, gbce_t=0.75)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    loss.backward()
    for tensor in (hidden, items):
        assert tensor.grad is not None
        assert torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().sum() > 0


def test_full_ce_equals_cross_entropy_by_hand():
    hidden, labels, items = inputs(1)
    logits = hidden @ items.T
    logits = logits[:, 1:]  # padding removed: classes 1..N
    expected = torch.stack(
        [torch.logsumexp(logits[p], 0) - logits[p, labels[p] - 1] for p in range(POSITIONS)]
    ).mean()
    torch.testing.assert_close(full_ce(hidden, labels, items), expected)
    torch.testing.assert_close(full_ce(hidden, labels, items), F.cross_entropy(logits, labels - 1))


def unfused_ce(hidden, labels, items):
    logits = hidden @ items.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("chunk", [1, 5, 12, 64])
def test_chunked_ce_matches_autograd_of_the_unfused_loss(chunk):
    """Loss and both gradients equal plain autograd, for chunks that do and do not divide P,
    and when the loss is scaled before backward (the stored gradients must be scaled too)."""
    hidden, labels, items = inputs(3)
    expected = unfused_ce(hidden, labels, items)
    exp_grads = torch.autograd.grad(3.0 * expected, [hidden, items])
    got = full_ce(hidden, labels, items, chunk=chunk)
    got_grads = torch.autograd.grad(3.0 * got, [hidden, items])
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, exp_grads):
        torch.testing.assert_close(g, e)
    assert got_grads[1][0].abs().max() == 0  # padding row gets no gradient


def test_chunked_ce_under_bf16_autocast_is_close_to_float32():
    hidden, labels, items = inputs(4)
    expected = unfused_ce(hidden, labels, items)
    exp_grads = torch.autograd.grad(expected, [hidden, items])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = full_ce(hidden, labels, items, chunk=5)
    got_grads = torch.autograd.grad(got, [hidden, items])
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    for g, e in zip(got_grads, exp_grads):
        torch.testing.assert_close(g, e, rtol=5e-2, atol=5e-3)


def test_full_ce_ignores_the_padding_row():
    hidden, labels, items = inputs(2)
    boosted = items.detach().clone()
    boosted[0] = hidden.detach().mean(0) * 100  # padding would win every softmax if it counted
    torch.testing.assert_close(full_ce(hidden, labels, boosted), full_ce(hidden, labels, items))


def test_full_ce_is_perfect_when_the_label_dominates():
    items = torch.eye(NUM_ITEMS + 1)[:, : NUM_ITEMS + 1] * 50
    labels = torch.arange(1, NUM_ITEMS + 1)
    hidden = torch.eye(NUM_ITEMS + 1)[labels]
    assert full_ce(hidden, labels, items).item() < 1e-6


def test_sampled_ce_uniform_log_q_is_softmax_over_sampled_items():
    hidden, labels, items = inputs(3)
    log_q = uniform_log_q()
    torch.manual_seed(5)
    loss = sampled_ce(hidden, labels, items, log_q, num_negatives=10)
    torch.manual_seed(5)
    negatives = torch.multinomial(log_q.exp(), 10, replacement=True)
    assert (negatives > 0).all()  # padding is never sampled
    pos = (hidden * items[labels]).sum(-1, keepdim=True)
    neg = (hidden @ items[negatives].T).masked_fill(negatives[None, :] == labels[:, None], float("-inf"))
    # A uniform correction shifts every logit by the same constant: the softmax is unchanged.
    expected = F.cross_entropy(torch.cat([pos, neg], 1), torch.zeros(POSITIONS, dtype=torch.long))
    torch.testing.assert_close(loss, expected)


def test_sampled_ce_with_popularity_log_q_is_finite_and_shift_invariant():
    hidden, labels, items = inputs(4)
    popular = uniform_log_q()
    popular[1:] = torch.log_softmax(torch.linspace(3, 0, NUM_ITEMS), 0)  # item 1 most popular
    flat = uniform_log_q()
    torch.manual_seed(0)
    a = sampled_ce(hidden, labels, items, popular, num_negatives=20)
    assert torch.isfinite(a)
    # Correction is relative: shifting log_q by a constant changes nothing.
    torch.manual_seed(0)
    b = sampled_ce(hidden, labels, items, popular - 3.0, num_negatives=20)
    torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    assert torch.isfinite(sampled_ce(hidden, labels, items, flat, num_negatives=20))


def test_sampled_ce_log_q_correction_matches_an_explicit_reference():
    """Non-uniform log_q, negatives fixed by the seed: every logit is its score minus its own log q.

    A version that drops the correction, flips its sign or applies it to negatives only gives a
    different value (checked below), so this pins the correction itself, not only finiteness.
    """
    hidden, labels, items = inputs(5)
    log_q = uniform_log_q()
    log_q[1:] = torch.log_softmax(torch.linspace(4, 0, NUM_ITEMS), 0)  # item 1 ~50x item N
    torch.manual_seed(13)
    loss = sampled_ce(hidden, labels, items, log_q, num_negatives=16)
    torch.manual_seed(13)
    negatives = torch.multinomial(log_q.exp(), 16, replacement=True)

    def reference(sign_pos: float, sign_neg: float) -> torch.Tensor:
        rows = []
        for p in range(POSITIONS):
            label = int(labels[p])
            pos = hidden[p] @ items[label] - sign_pos * log_q[label]
            neg = [hidden[p] @ items[n] - sign_neg * log_q[n] for n in negatives.tolist() if n != label]
            logits = torch.stack([pos, *neg])
            rows.append(torch.logsumexp(logits, 0) - pos)
        return torch.stack(rows).mean()

    expected = reference(1.0, 1.0)
    torch.testing.assert_close(loss, expected)
    for broken in (reference(0.0, 0.0), reference(-1.0, -1.0), reference(0.0, 1.0), reference(1.0, 0.0)):
        assert (broken - expected).abs() > 1e-2  # each mutation is distinguishable here


@pytest.mark.parametrize("name", LOSSES)
def test_loss_decreases_when_the_positive_score_grows(name):
    # Orthonormal item vectors: moving each state towards its label raises the positive score only.
    items = torch.eye(NUM_ITEMS + 1)
    labels = torch.randint(1, NUM_ITEMS + 1, (POSITIONS,), generator=torch.Generator().manual_seed(6))
    base = torch.randn(POSITIONS, NUM_ITEMS + 1, generator=torch.Generator().manual_seed(7))
    values = []
    for scale in (0.0, 2.0, 8.0):
        torch.manual_seed(11)  # same negatives each time
        values.append(
            item_loss(
                name,
                base + scale * items[labels],
                labels,
                items,
                log_q=uniform_log_q(),
                num_negatives=8,
                gbce_t=0.75,
            ).item()
        )
    assert all(torch.isfinite(torch.tensor(values)))
    assert values[0] > values[1] > values[2]


def test_gbce_t0_is_plain_bce_with_the_same_negatives():
    hidden, labels, items = inputs(7)
    torch.manual_seed(9)
    loss = gbce(hidden, labels, items, num_negatives=6, t=0.0)
    torch.manual_seed(9)
    negatives = torch.randint(1, NUM_ITEMS + 1, (6,))  # shared by every position
    pos = (hidden * items[labels]).sum(-1)
    neg = torch.einsum("ph,mh->pm", hidden, items[negatives])
    pos_bce = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="none")
    neg_bce = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")
    neg_bce = neg_bce.masked_fill(negatives[None, :] == labels[:, None], 0.0)  # accidental hits
    torch.testing.assert_close(loss, (pos_bce + neg_bce.sum(1)).mean())


def test_gbce_t_scales_only_the_positive_term():
    hidden, labels, items = inputs(8)
    out = {}
    for t in (0.0, 1.0):
        torch.manual_seed(1)
        out[t] = gbce(hidden, labels, items, num_negatives=6, t=t).item()
    # t=1 gives beta = alpha = 6 / 29 < 1: the positive term weighs less, the loss is smaller.
    assert out[1.0] < out[0.0]


def test_unknown_loss_and_missing_log_q():
    hidden, labels, items = inputs()
    with pytest.raises(ValueError, match="unknown loss 'bpr'"):
        item_loss("bpr", hidden, labels, items)
    with pytest.raises(ValueError, match="log_q"):
        item_loss("sampled", hidden, labels, items, log_q=None)


def test_contrastive_rewards_agreeing_views_and_counts_same_label_positions_as_positives():
    """Two views that agree score lower than unrelated ones; positions with the same next item
    are pulled together too, so making them agree lowers the loss further."""
    g = torch.Generator().manual_seed(0)
    first = torch.randn(POSITIONS, HIDDEN, generator=g)
    distinct = torch.arange(1, POSITIONS + 1)
    agreeing = contrastive(first, first + 0.01 * torch.randn(POSITIONS, HIDDEN, generator=g), distinct, 1.0)
    unrelated = contrastive(first, torch.randn(POSITIONS, HIDDEN, generator=g), distinct, 1.0)
    assert agreeing < unrelated

    pairs = torch.arange(POSITIONS) // 2 + 1  # positions 2i and 2i+1 share their next item
    apart = contrastive(first, first, pairs, 1.0)
    together = first.clone()
    together[1::2] = together[0::2]
    assert contrastive(together, together, pairs, 1.0) < apart

    hidden = first.clone().requires_grad_(True)
    loss = contrastive(hidden, hidden * 1.1, pairs, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
