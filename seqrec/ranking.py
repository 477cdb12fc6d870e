"""The one masking + top-k function, shared by offline evaluation and nightly scoring.

Evaluation and production must never disagree about what a user can be shown, so both call
:func:`rank_unseen`. It scores the catalogue in chunks (so memory does not grow with catalogue
size and the score block stays cache-sized), masks each user's history by scatter into the chunk
(no dense per-user masks), masks unavailable items, and keeps a running top-k. Given targets it
also returns each target's full-catalogue rank, counted in the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class Ranked:
    scores: torch.Tensor               # (B, k) best first
    indices: torch.Tensor              # (B, k) item indices (vocabulary / item-table rows)
    target_rank: torch.Tensor | None   # (B,) 1-based rank of the target, inf if it was excluded


@torch.inference_mode()
def rank_unseen(queries: torch.Tensor, items: torch.Tensor, seen: torch.Tensor, k: int, *,
                excluded: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                chunk_size: int = 16384) -> Ranked:
    """Top-``k`` items per query among those not in ``seen`` and not ``excluded``.

    queries:  (B, H) user vectors, or (B, 1) ones for a popularity baseline.
    items:    (N, H) item table; row 0 is padding and is never returned.
    seen:     (B, L) item indices each user already interacted with, 0-padded.
    excluded: (N,) bool, True for items that must never be recommended (unavailable, [MASK]).
    targets:  (B,) item indices whose rank to report (leave-one-out evaluation).
    """
    batch, num_items = queries.shape[0], items.shape[0]
    k = min(k, num_items - 1)
    rows = torch.arange(batch, device=queries.device)
    if targets is not None:
        target_score = (queries * items[targets]).sum(-1, keepdim=True)     # (B, 1)
        target_hidden = (seen == targets[:, None]).any(1) | (targets == 0)
        if excluded is not None:
            target_hidden |= excluded[targets]
        higher = torch.zeros(batch, dtype=torch.long, device=queries.device)

    best_scores = torch.full((batch, k), NEG_INF, device=queries.device, dtype=queries.dtype)
    best_indices = torch.zeros((batch, k), dtype=torch.long, device=queries.device)
    for start in range(0, num_items, chunk_size):
        stop = min(start + chunk_size, num_items)
        scores = queries @ items[start:stop].T                               # (B, C)
        local = seen - start                                                  # (B, L)
        hit = (local >= 0) & (local < stop - start)
        scores[rows[:, None].expand_as(local)[hit], local[hit]] = NEG_INF   # history, by scatter
        if start == 0:
            scores[:, 0] = NEG_INF                                            # padding row
        if excluded is not None:
            scores[:, excluded[start:stop]] = NEG_INF
        if targets is not None:
            higher += (scores > target_score).sum(1)
        chunk_k = min(k, stop - start)
        top_scores, top_local = scores.topk(chunk_k, dim=1)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_indices = torch.cat([best_indices, top_local + start], dim=1)
        best_scores, order = merged_scores.topk(k, dim=1)
        best_indices = merged_indices.gather(1, order)

    target_rank = None
    if targets is not None:
        target_rank = (higher + 1).to(torch.float32)
        target_rank[target_hidden] = float("inf")
    return Ranked(scores=best_scores, indices=best_indices, target_rank=target_rank)


def ranking_metrics(ranks: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """HR@k, NDCG@k (one relevant item) and MRR from 1-based ranks; sums, not means."""
    out: dict[str, float] = {"mrr": (1.0 / ranks).sum().item()}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = hit.sum().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks)).sum().item()
    return out
