"""seqrec.ranking: the one masking + top-k function, checked against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from seqrec.ranking import at_least, popularity_ranks, rank_unseen, ranking_metrics

INF = float("inf")

# Row 0 is padding. With the queries below every score is exact in float32 (powers of two).
ITEMS = torch.tensor(
    [
        [0.0, 0.0],  # 0 padding
        [1.0, 0.0],  # 1
        [0.0, 1.0],  # 2
        [1.0, 1.0],  # 3
        [2.0, -1.0],  # 4
        [-1.0, 2.0],
    ]
)  # 5
QUERIES = torch.tensor(
    [
        [1.0, 0.25],  # scores 1, .25, 1.25, 1.75, -.5  -> order 4 3 1 2 5
        [0.25, 1.0],
    ]
)  # scores .25, 1, 1.25, -.5, 1.75  -> order 5 3 2 1 4
NO_HISTORY = torch.zeros(2, 1, dtype=torch.long)


def test_hand_computed_order():
    ranked = rank_unseen(QUERIES, ITEMS, NO_HISTORY, k=5)
    assert ranked.indices.tolist() == [[4, 3, 1, 2, 5], [5, 3, 2, 1, 4]]
    assert ranked.scores.tolist() == [[1.75, 1.25, 1.0, 0.25, -0.5], [1.75, 1.25, 1.0, 0.25, -0.5]]
    assert ranked.target_rank is None


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 16384])
def test_seen_and_excluded_items_are_never_returned(chunk_size):
    seen = torch.tensor([[4, 0, 0], [3, 5, 3]])  # padded, with a repeat
    ranked = rank_unseen(QUERIES, ITEMS, seen, k=3, chunk_size=chunk_size)
    assert ranked.indices.tolist() == [[3, 1, 2], [2, 1, 4]]
    assert ranked.scores.tolist() == [[1.25, 1.0, 0.25], [1.0, 0.25, -0.5]]

    excluded = torch.tensor([False, True, False, False, False, False])  # item 1 unavailable
    ranked = rank_unseen(QUERIES, ITEMS, seen, k=3, excluded=excluded, chunk_size=chunk_size)
    assert ranked.indices.tolist()[0] == [3, 2, 5]
    assert ranked.indices.tolist()[1][:2] == [2, 4]
    assert ranked.scores.tolist()[1] == [1.0, -0.5, -INF]  # only two items left for user 1


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 16384])
def test_padding_is_never_returned(chunk_size):
    # Every item scores below the padding row's 0: padding must still not appear.
    ranked = rank_unseen(
        torch.tensor([[-1.0, -1.0]]),
        ITEMS.abs() + 0.5,
        torch.zeros(1, 1, dtype=torch.long),
        k=5,
        chunk_size=chunk_size,
    )
    assert 0 not in ranked.indices.tolist()[0]
    assert torch.isfinite(ranked.scores).all()
    assert sorted(ranked.indices.tolist()[0]) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 16384])
def test_k_beyond_unseen_items_leaves_minus_inf_tail(chunk_size):
    seen = torch.tensor([[4, 3, 1], [0, 0, 0]])
    ranked = rank_unseen(QUERIES, ITEMS, seen, k=4, chunk_size=chunk_size)
    assert ranked.scores.shape == (2, 4)
    assert ranked.indices.tolist()[0][:2] == [2, 5]
    assert ranked.scores.tolist()[0] == [0.25, -0.5, -INF, -INF]
    assert torch.isfinite(ranked.scores[1]).all()
    # k larger than the catalogue is clipped to the number of real items.
    ranked = rank_unseen(QUERIES, ITEMS, seen, k=50, chunk_size=chunk_size)
    assert ranked.scores.shape == (2, 5)
    assert torch.isinf(ranked.scores[0, 2:]).all() and torch.isfinite(ranked.scores[1]).all()


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 16384])
def test_target_rank(chunk_size):
    seen = torch.tensor([[4, 0], [3, 5]])
    # user 0 unseen order 3 1 2 5 -> item 1 is 2nd; user 1 unseen order 2 1 4 -> item 4 is 3rd.
    ranked = rank_unseen(QUERIES, ITEMS, seen, k=2, targets=torch.tensor([1, 4]), chunk_size=chunk_size)
    assert ranked.target_rank.tolist() == [2.0, 3.0]
    assert ranked.target_rank.dtype == torch.float32

    # A target in the history, an excluded target, and padding as target: inf.
    excluded = torch.tensor([False, False, True, False, False, False])
    ranked = rank_unseen(
        QUERIES, ITEMS, seen, k=2, targets=torch.tensor([4, 2]), excluded=excluded, chunk_size=chunk_size
    )
    assert ranked.target_rank.tolist() == [INF, INF]
    ranked = rank_unseen(
        QUERIES, ITEMS, seen, k=2, targets=torch.tensor([0, 1]), excluded=excluded, chunk_size=chunk_size
    )
    assert ranked.target_rank.tolist() == [INF, 1.0]  # items 3, 5 seen, 2 excluded: user 1 order is 1 4


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 16384])
def test_ties_count_against_the_target(chunk_size):
    # Query (1, 0): items 1 and 3 both score 1, item 4 scores 2.
    ranked = rank_unseen(
        torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
        ITEMS,
        NO_HISTORY,
        k=2,
        targets=torch.tensor([1, 3]),
        chunk_size=chunk_size,
    )
    assert ranked.target_rank.tolist() == [3.0, 3.0]


def test_hit_at_k_means_the_target_is_in_the_top_k_list():
    """Evaluation must not count a hit that the served list would not show (popularity has many ties)."""
    torch.manual_seed(3)
    batch, num_items, k = 64, 40, 5
    table = torch.randint(0, 3, (num_items, 1)).float()  # 3 distinct scores: massive ties
    seen = torch.randint(0, num_items, (batch, 6))
    targets = torch.randint(1, num_items, (batch,))
    ranked = rank_unseen(torch.ones(batch, 1), table, seen, k=k, targets=targets, chunk_size=7)
    for b in range(batch):
        if ranked.target_rank[b] <= k:
            assert targets[b].item() in ranked.indices[b].tolist()


def reference(queries, items, seen, k, excluded=None, targets=None):
    """Dense-mask, full-sort reference implementation."""
    scores = queries @ items.T
    scores[:, 0] = -INF
    for b in range(len(seen)):
        scores[b, seen[b]] = -INF
    if excluded is not None:
        scores[:, excluded] = -INF
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    ranks = None
    if targets is not None:
        ranks = []
        for b, t in enumerate(targets.tolist()):
            own = scores[b, t].item()
            ranks.append(INF if own == -INF else float((scores[b] > own).sum().item() + 1))
    return scores.gather(1, order), order, ranks


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 17, 100_000])
def test_random_data_chunking_matches_reference(chunk_size):
    torch.manual_seed(0)
    batch, num_items, hidden, k = 16, 53, 8, 10
    queries = torch.randn(batch, hidden)
    items = torch.randn(num_items, hidden)
    seen = torch.randint(0, num_items, (batch, 12))
    excluded = torch.rand(num_items) < 0.1
    targets = torch.randint(1, num_items, (batch,))
    targets[:4] = seen[:4, 0].clamp(min=1)  # some targets are in the history
    seen[:4, 0] = targets[:4]

    ranked = rank_unseen(queries, items, seen, k, excluded=excluded, targets=targets, chunk_size=chunk_size)
    one_chunk = rank_unseen(queries, items, seen, k, excluded=excluded, targets=targets, chunk_size=num_items)
    ref_scores, ref_indices, ref_ranks = reference(queries, items, seen, k, excluded, targets)

    assert torch.equal(ranked.indices, one_chunk.indices)
    assert torch.equal(ranked.target_rank, one_chunk.target_rank)
    torch.testing.assert_close(ranked.scores, one_chunk.scores)
    assert torch.equal(ranked.indices, ref_indices)
    torch.testing.assert_close(ranked.scores, ref_scores)
    assert ranked.target_rank.tolist() == ref_ranks
    assert all(r == INF for r in ranked.target_rank[:4].tolist())
    for b in range(batch):
        returned = set(ranked.indices[b].tolist())
        assert not returned & set(seen[b].tolist())
        assert not returned & set(torch.nonzero(excluded).flatten().tolist())
        assert 0 not in returned


def test_target_rank_is_exact_for_wide_float_embeddings():
    """The target must not count itself, although matmul and elementwise sums round differently."""
    torch.manual_seed(1)
    batch, num_items, hidden = 128, 3000, 64
    queries, items = torch.randn(batch, hidden), torch.randn(num_items, hidden)
    targets = torch.randint(1, num_items, (batch,))
    seen = torch.zeros(batch, 1, dtype=torch.long)
    full = queries @ items.T
    full[:, 0] = -INF
    own = full[torch.arange(batch), targets]
    expected = ((full > own[:, None]).sum(1) + 1).float()
    for chunk_size in (16384, 1000):
        ranked = rank_unseen(queries, items, seen, 10, targets=targets, chunk_size=chunk_size)
        assert torch.equal(ranked.target_rank, expected)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def test_metrics_hand_computed():
    ranks = torch.tensor([1.0, 3.0, 11.0, INF])
    m = ranking_metrics(ranks, [1, 10, 20])
    assert m["hr@1"] == 1
    assert m["ndcg@1"] == pytest.approx(1.0)
    assert m["hr@10"] == 2
    assert m["ndcg@10"] == pytest.approx(1.0 + 0.5)  # 1/log2(2) + 1/log2(4)
    assert m["hr@20"] == 3
    assert m["ndcg@20"] == pytest.approx(1.5 + 1 / math.log2(12))
    assert m["mrr"] == pytest.approx(1 + 1 / 3 + 1 / 11)


@pytest.mark.parametrize(
    "rank,ndcg10,hr10",
    [(1.0, 1.0, 1), (3.0, 0.5, 1), (10.0, 1 / math.log2(11), 1), (11.0, 0.0, 0), (INF, 0.0, 0)],
)
def test_single_rank_metrics(rank, ndcg10, hr10):
    m = ranking_metrics(torch.tensor([rank]), [10])
    assert m["ndcg@10"] == pytest.approx(ndcg10)
    assert m["hr@10"] == hr10
    assert m["mrr"] == pytest.approx(0.0 if rank == INF else 1 / rank)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_alone_and_shared_scores_match_the_full_ranking(seed):
    """k=0 gives the same target ranks without the lists; :func:`popularity_ranks` gives what
    ranking ``popularity`` for every user gives, with ties, repeated history, excluded and hidden
    targets (the evaluation's fast paths must not change a metric)."""
    generator = torch.Generator().manual_seed(seed)
    users, num_items, hidden = 64, 300, 8
    queries = torch.randn(users, hidden, generator=generator)
    items = torch.randn(num_items, hidden, generator=generator)
    seen = torch.randint(0, num_items, (users, 20), generator=generator)
    seen[:, 10:] = seen[:, :10]  # repeats
    seen[::3, 15:] = 0  # padding
    targets = torch.randint(1, num_items, (users,), generator=generator)
    targets[::7] = seen[::7, 0].clamp(min=1)  # some targets in the history: rank inf
    excluded = torch.rand(num_items, generator=generator) < 0.1
    targets[::11] = excluded.nonzero()[0, 0]  # and some excluded

    full = rank_unseen(queries, items, seen, 10, excluded=excluded, targets=targets, chunk_size=64)
    alone = rank_unseen(queries, items, seen, 0, excluded=excluded, targets=targets, chunk_size=64)
    assert torch.equal(alone.target_rank, full.target_rank) and alone.indices.shape == (users, 0)

    popularity = torch.randint(0, 12, (num_items,), generator=generator).float()  # many ties
    popularity[0] = -1.0
    reference = rank_unseen(
        torch.ones(users, 1), popularity[:, None], seen, 10, excluded=excluded, targets=targets
    ).target_rank
    shared = popularity_ranks(popularity, seen, targets, excluded=excluded)
    assert torch.isinf(shared).sum() > 0 and torch.isfinite(shared).sum() > users // 2
    assert torch.equal(shared, reference)
    assert torch.equal(
        popularity_ranks(popularity, seen, targets),
        rank_unseen(torch.ones(users, 1), popularity[:, None], seen, 10, targets=targets).target_rank,
    )


def test_the_sign_bit_count_equals_the_comparison_count():
    """at_least counts ties, -inf and both signs exactly as ``(scores >= threshold).sum(1)``."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(37, 1000, generator=g).round(decimals=1)  # many exact ties
    scores[:, ::7] = float("-inf")
    scores[3] = 0.0  # +0.0 against a -0.0 threshold, and every item a tie
    threshold = scores[:, 11:12].clone()
    threshold[3] = -0.0
    threshold[5] = float("-inf")  # a masked target: every item counts
    buffer = torch.empty(scores.numel())
    counted = at_least(scores, threshold, buffer)
    assert torch.equal(counted, (scores >= threshold).sum(1))
    assert counted[3] == 1000 and counted[5] == 1000
